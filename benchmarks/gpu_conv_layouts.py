"""Which depth-wise conv formulation is fastest on this GPU, measured end to end on the full model.

The network's time-mixing convs are depth-wise (kernel 17 in every FFConvM, 39 taps in the dense net). cuDNN's
kernel choice for them depends on the memory layout and on the GPU / library version, so this script times the
whole batch-1 forward (4 s, CUDA graph, bf16 autocast) under each combination of:

- ``CUDA_DEPTHWISE_LAYOUT``: "channels_last" (the [B, C, 1, T] view of [B, T, C], no copy) or "contiguous";
- ``CUDA_DILATE_KERNEL``: dilated convs as undilated ones with a zero-stuffed kernel;
- ``torch.backends.cudnn.benchmark`` (cuDNN tries its algorithms once per shape).

Under the fastest it also times fp32, batch-16 throughput, and compiled layers + CUDA graph, and writes a kernel
profile. Every output is scored against eager fp32 (SI-SDR). CUDA only::

    python benchmarks/gpu_conv_layouts.py --json layouts.json --profile layouts_profile.txt
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mossformer2 import MossFormer2Config, build_model
from mossformer2.losses import si_sdr
from mossformer2.models import convolution
from mossformer2.separation.cuda_graphs import CudaGraphModel

SR = 16000


def timed(fn: Any, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def configure(layout: str, dilate: bool, benchmark: bool) -> None:
    convolution.CUDA_DEPTHWISE_LAYOUT = layout
    convolution.CUDA_DILATE_KERNEL = dilate
    torch.backends.cudnn.benchmark = benchmark


def graphed(model: torch.nn.Module, dtype: torch.dtype | None, wave: torch.Tensor,
            repeats: int) -> tuple[float, torch.Tensor]:
    runner = CudaGraphModel(model, dtype)
    with torch.inference_mode():
        return timed(lambda: runner(wave), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="throughput batch")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(MossFormer2Config()).cuda().eval()
    wave = (0.056 * torch.randn(1, int(args.seconds * SR), generator=torch.Generator().manual_seed(0))).cuda()
    with torch.inference_mode():
        reference = model(wave).float()
    rows: list[dict[str, Any]] = []

    def record(name: str, seconds: float, out: torch.Tensor, audio_s: float, ref: torch.Tensor = reference,
               **info: Any) -> None:
        row = {"variant": name, "median_s": seconds, "rtf": seconds / audio_s,
               "si_sdr_vs_fp32_db": float(si_sdr(out.float().cpu(), ref.cpu()).mean()), **info}
        rows.append(row)
        print(f"{name:<58} {seconds * 1e3:8.2f} ms  RTF {row['rtf']:.4f}  SI-SDR vs fp32 "
              f"{row['si_sdr_vs_fp32_db']:.1f} dB", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                             "rows": rows}, indent=2))

    combos = list(itertools.product(["channels_last", "contiguous"], [False, True], [False, True]))
    results = {}
    for layout, dilate, bench in combos:
        configure(layout, dilate, bench)
        seconds, out = graphed(model, torch.bfloat16, wave, args.repeats)
        results[(layout, dilate, bench)] = seconds
        record(f"graph bf16 b1 layout={layout} dilate={dilate} cudnn.benchmark={bench}", seconds, out, args.seconds,
               layout=layout, dilate_kernel=dilate, cudnn_benchmark=bench)
    best = min(results, key=results.get)
    configure(*best)
    print(f"fastest: layout={best[0]} dilate_kernel={best[1]} cudnn.benchmark={best[2]}", flush=True)
    seconds, out = graphed(model, None, wave, args.repeats)
    record("best: graph fp32 b1", seconds, out, args.seconds)
    batch = (0.056 * torch.randn(args.batch, int(args.seconds * SR),
                                 generator=torch.Generator().manual_seed(1))).cuda()
    with torch.inference_mode():
        batch_ref = model(batch).float()
    seconds, out = graphed(model, torch.bfloat16, batch, 5)
    record(f"best: graph bf16 b{args.batch}", seconds, out, args.seconds * args.batch, ref=batch_ref)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(wave)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(wave)
                torch.cuda.synchronize()
        args.profile.write_text(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30,
                                                          max_name_column_width=70))
    if not args.no_compile:
        compiled = copy.deepcopy(model)
        layers = compiled.mask_net.mdl.intra_mdl.mossformerM
        for layer in [*layers.layers, *layers.fsmn]:
            layer.compile(dynamic=False)
        start = time.perf_counter()
        seconds, out = graphed(compiled, torch.bfloat16, wave, args.repeats)
        record("best: compiled layers + graph bf16 b1", seconds, out, args.seconds,
               setup_s=time.perf_counter() - start)
        seconds, out = graphed(compiled, torch.bfloat16, batch, 5)
        record(f"best: compiled layers + graph bf16 b{args.batch}", seconds, out, args.seconds * args.batch,
               ref=batch_ref)


if __name__ == "__main__":
    main()

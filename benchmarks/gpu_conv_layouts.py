"""Which depth-wise conv layout is fastest on this GPU, measured end to end on the full model.

The network's time-mixing convs are depth-wise (kernel 17 in every FFConvM, 39 taps in the dense net). cuDNN's
kernel choice for them depends on the memory layout and on the GPU / library version, so this script times the
whole batch-1 forward (4 s, CUDA graph, bf16 autocast) under each combination of:

- ``models.convolution.CUDA_DEPTHWISE_LAYOUT``: "channels_last" (the [B, C, 1, T] view of [B, T, C], no copy) or
  "contiguous";
- ``torch.backends.cudnn.benchmark`` (cuDNN tries its algorithms once per shape).

Under the fastest it also times fp32, batch-16 throughput, and compiled layers + CUDA graph (whose depth-wise
convs are shifted sums whatever the layout: ``MossFormer2.compile_layers``), and writes a kernel profile.
Every output is scored against eager fp32 (SI-SDR). CUDA only::

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
from benchmark import compare, profile_forward, speech_like, time_call

from mossformer2 import MossFormer2Config, build_model
from mossformer2.models import convolution
from mossformer2.separation.cuda_graphs import CudaGraphModel

SR = 16000


def configure(layout: str, cudnn_benchmark: bool) -> None:
    convolution.CUDA_DEPTHWISE_LAYOUT = layout
    torch.backends.cudnn.benchmark = cudnn_benchmark


def graphed(model: torch.nn.Module, dtype: torch.dtype | None, wave: torch.Tensor,
            repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``repeats`` CUDA graph replays (after capture) and the last output."""
    runner = CudaGraphModel(model, dtype)
    with torch.inference_mode():
        times, out = time_call(lambda: runner(wave), wave.device, repeats, warmup=1)
    return statistics.median(times), out


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
    wave = speech_like(1, int(args.seconds * SR)).cuda()
    batch = speech_like(args.batch, int(args.seconds * SR), seed=1).cuda()
    with torch.inference_mode():
        reference, batch_reference = model(wave), model(batch)
    rows: list[dict[str, Any]] = []

    def record(name: str, seconds: float, out: torch.Tensor, **info: Any) -> None:
        ref = reference if out.shape[0] == 1 else batch_reference
        row = {"variant": name, "median_s": seconds, "rtf": seconds / (args.seconds * out.shape[0]),
               **compare(out, ref), **info}
        rows.append(row)
        print(f"{name:<50} {seconds * 1e3:8.2f} ms  RTF {row['rtf']:.4f}  SI-SDR vs fp32 "
              f"{row['si_sdr_vs_fp32_db']:.1f} dB", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                             "rows": rows}, indent=2))

    results = {}
    for layout, cudnn_benchmark in itertools.product(["channels_last", "contiguous"], [False, True]):
        configure(layout, cudnn_benchmark)
        seconds, out = graphed(model, torch.bfloat16, wave, args.repeats)
        results[(layout, cudnn_benchmark)] = seconds
        record(f"graph bf16 b1 layout={layout} cudnn.benchmark={cudnn_benchmark}", seconds, out,
               layout=layout, cudnn_benchmark=cudnn_benchmark)
    best = min(results, key=results.get)
    configure(*best)
    print(f"fastest: layout={best[0]} cudnn.benchmark={best[1]}", flush=True)
    record("best: graph fp32 b1", *graphed(model, None, wave, args.repeats))
    record(f"best: graph bf16 b{args.batch}", *graphed(model, torch.bfloat16, batch, 5))
    if args.profile:
        profile_forward(model, wave, args.profile)
    if not args.no_compile:
        compiled = copy.deepcopy(model).compile_layers(dynamic=False)  # depth-wise convs as shifted sums
        start = time.perf_counter()
        seconds, out = graphed(compiled, torch.bfloat16, wave, args.repeats)
        record("best: compiled layers + graph bf16 b1", seconds, out, setup_s=time.perf_counter() - start)
        record(f"best: compiled layers + graph bf16 b{args.batch}", *graphed(compiled, torch.bfloat16, batch, 5))


if __name__ == "__main__":
    main()

"""Which part of ``MossFormer2.compile_layers`` makes compiled output differ from eager on CUDA.

Session 8 found, on an H200, the Separator on ``compile_layers()`` with CUDA graphs 11.9 dB SI-SDR from eager fp32
in float32, but 36.8 dB in bf16 (benchmarks/RESULTS.md). This script separates the suspects, one row each, on the
same input (batch 3, random full model), scored against eager fp32 with TF32 off everywhere:

- which regions are compiled (FLASH layers, FSMN blocks, both);
- depth-wise convs as cuDNN / PyTorch kernels, as fused shifted sums, or as shifted sums of a stored input or of
  an input that its producer writes padded (session 15's "shifted_sum_realized", row 2);
- with or without a CUDA graph around the compiled model;
- float32 or bf16 autocast;
- equal lengths, or a zero-padded batch with ``lengths`` (the masked path, which padded batches of short files
  take);
- items of 4 s, or of 10 s as in session 8's failing check (three 10 s chunks in one CUDA graph, fp32).

A row scores far below the others' precision (fp32 > 60 dB, bf16 > 30 dB) where the fault lies. A first probe row
compares the rotary cos / sin tables of a 10 s item (20,000 frames, angles up to 20,000 rad) computed by a compiled
function with eager ones (GPU code generators may use fast, approximate sin / cos). Session 13 (H200, rows 1, 3
and 4 of today's list, and the probe): the tables are equal (0.0 difference); fused shifted sums 11.8 dB in
float32, stored conv inputs 94.0 dB (CUDA graph, 10 s) and 90.2 dB (4 s): the fault lies in the fused producer of
the shifted sums, hence ``compile_layers``' default "shifted_sum_stored". CPU dry run (the convs stay convs there)::

    python benchmarks/gpu_compile_diagnosis.py --device cpu --tiny --rows 1
    python benchmarks/gpu_compile_diagnosis.py --json diagnosis.json       # CUDA, ~8 min (12 rows)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from pathlib import Path
from typing import NamedTuple

import torch

from mossformer2 import MossFormer2Config, build_model
from mossformer2.losses import si_sdr
from mossformer2.models.config import tiny_test_config
from mossformer2.separation.cuda_graphs import CudaGraphModel


class Row(NamedTuple):
    name: str
    regions: str  # "flash", "fsmn" or "both"
    layout: str  # depth-wise convs: "" (cuDNN / PyTorch kernels) or a key of convolution.SHIFTED_SUM_INPUTS
    graph: bool  # a CUDA graph around the compiled model (not for padded batches: CudaGraphModel runs them eagerly)
    dtype: torch.dtype
    padded: bool = False  # items of PADDED_FRACTIONS of the length, zero-padded, with ``lengths``
    seconds: float = 4.0  # length of each of the three items


# Rows 1, 3 and 4 ran in session 13 (see above); row 2 is session 15's form; the rest narrow down the fused form's
# fault further.
SUM, STORED, REALIZED = "shifted_sum", "shifted_sum_stored", "shifted_sum_realized"
ROWS = [
    Row("both regions, stored conv inputs, fp32, CUDA graph, 10 s", "both", STORED, True, torch.float32,
        seconds=10.0),
    # Session 15: the producer writes the padded conv input itself; is it as exact as the stored form?
    Row("both regions, realized conv inputs, fp32, CUDA graph, 10 s", "both", REALIZED, True, torch.float32,
        seconds=10.0),
    Row("both regions, shifted sums, fp32, CUDA graph, 10 s", "both", SUM, True, torch.float32, seconds=10.0),
    Row("both regions, stored conv inputs, fp32", "both", STORED, False, torch.float32),
    Row("both regions, shifted sums, fp32", "both", SUM, False, torch.float32),
    Row("both regions, shifted sums, fp32, padded batch", "both", SUM, False, torch.float32, padded=True),
    Row("both regions, default convs, fp32", "both", "", False, torch.float32),
    Row("FLASH only, default convs, fp32", "flash", "", False, torch.float32),
    Row("FSMN only, shifted sums, fp32", "fsmn", SUM, False, torch.float32),
    Row("both regions, shifted sums, fp32, CUDA graph", "both", SUM, True, torch.float32),
    Row("both regions, shifted sums, bf16, CUDA graph", "both", SUM, True, torch.bfloat16),
    Row("both regions, shifted sums, bf16, padded batch", "both", SUM, False, torch.bfloat16, padded=True),
]
PADDED_FRACTIONS = (1.0, 0.78, 0.5627)  # of the batch length; the last one not a multiple of the hop


def compiled_copy(model: torch.nn.Module, regions: str, layout: str) -> torch.nn.Module:
    """A copy of ``model`` with the chosen regions compiled (``compile_layers`` restricted to them)."""
    model = copy.deepcopy(model)
    if layout:
        model.set_cuda_depthwise_layout(layout)
    layers = model.layer_stack()
    chosen = {"flash": [*layers.layers], "fsmn": [*layers.fsmn], "both": [*layers.layers, *layers.fsmn]}[regions]
    for layer in chosen:
        layer.compile(dynamic=False)
    return model


def probe_rotary_tables(model: torch.nn.Module, device: torch.device, frames: int = 20_000) -> dict:
    """Largest difference between compiled and eager rotary cos / sin tables of ``frames`` frames (float32)."""
    rotary = model.layer_stack().layers[0].rotary_pos_emb
    torch._dynamo.reset()
    start = time.perf_counter()
    try:
        def tables() -> tuple[torch.Tensor, torch.Tensor]:
            return rotary.cos_sin(frames, device, torch.float32)

        with torch.inference_mode():
            eager = tables()
            compiled = torch.compile(tables, dynamic=False)()
        row = {"variant": f"probe: rotary cos/sin tables, {frames} frames, compiled vs eager, fp32",
               "max_abs_diff": max(float((c - e).abs().max()) for c, e in zip(compiled, eager))}
    except Exception as err:  # a probe must not stop the rows
        row = {"variant": "probe: rotary cos/sin tables", "error": f"{type(err).__name__}: {err}"}
    row["seconds"] = time.perf_counter() - start
    return row


def score_db(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float(si_sdr(estimate.double().flatten(0, 1), reference.double().flatten(0, 1)).mean())


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny random model, quarter-length items (CPU dry run)")
    parser.add_argument("--rows", type=int, default=len(ROWS), help="run the first N rows")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = build_model(tiny_test_config() if args.tiny else MossFormer2Config()).to(device).eval()
    results = [probe_rotary_tables(model, device)]
    print(json.dumps(results[0]), flush=True)
    for name, regions, layout, graph, dtype, pad, seconds in ROWS[: args.rows]:
        if dtype != torch.float32 and device.type != "cuda":
            continue  # compiled bf16 does not finish on the CPU (torch 2.13)
        samples = int(seconds * 16000 * (0.25 if args.tiny else 1))  # the CPU dry run: quarter-length items
        wave = 0.1 * torch.randn(3, samples, generator=torch.Generator().manual_seed(1)).to(device)
        lengths = torch.tensor([int(f * samples) for f in PADDED_FRACTIONS], device=device)
        valid = (torch.arange(samples, device=device) < lengths[:, None]).unsqueeze(1)  # [B, 1, T]
        if pad:
            wave = wave * valid[:, 0]
        with torch.inference_mode():
            reference = model(wave, lengths) * valid if pad else model(wave)
        torch._dynamo.reset()  # each row compiles afresh: no code cached from an earlier row
        start = time.perf_counter()
        try:
            compiled = compiled_copy(model, regions, layout)
            if graph and device.type == "cuda":
                runner = CudaGraphModel(compiled, dtype)
                with torch.inference_mode():
                    out = runner(wave)
            else:
                autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                            else contextlib.nullcontext())
                with torch.inference_mode(), autocast:
                    out = compiled(wave, lengths) * valid if pad else compiled(wave)
            row = {"variant": name, "si_sdr_vs_eager_fp32_db": score_db(out, reference),
                   "max_abs_diff": float((out.float() - reference).abs().max())}
        except Exception as err:  # one failing row must not hide the others
            row = {"variant": name, "error": f"{type(err).__name__}: {err}"}
        row["seconds"] = time.perf_counter() - start
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

"""Device checks for the separation paths (issue 3's GPU bullets), as one short script for a lent GPU.

1. A zero-padded batch of unequal lengths with ``lengths`` equals each item separated alone (fp32).
2. ``Separator`` in bfloat16 / float16 (float16 only on CUDA) stays close to float32 (SI-SDR in dB).
3. ``Separator(cuda_graphs=True)`` captured graphs and equals eager (CUDA only).
4. ``Separator(compile_layers=True)`` (``MossFormer2.compile_layers``) equals eager in fp32 and stays within
   30 dB of it in bf16 (``--checks``).
5. A long file through the chunked ``Separator``: peak device memory (``torch.cuda.max_memory_allocated``, or
   on the CPU the peak RSS during this check where ``/proc/self/clear_refs`` can reset it, else the process's) and
   real-time factor (with ``--long-compile``, timed on a second pass after compiling).

Prints one JSON object on stdout (the report so far goes to stderr before the long file, the longest check) and
exits 1 if a check fails. CPU dry run (CI runs it, tiny random model)::

    python benchmarks/gpu_checks.py --device cpu --tiny --minutes 0.2
    python benchmarks/gpu_checks.py --device cuda --minutes 60 --json gpu_checks.json   # full model
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark.py beside this script, also when imported
from benchmark import peak_memory  # noqa: E402

from mossformer2 import MossFormer2Config, Separator, build_model, load_model  # noqa: E402
from mossformer2.losses import si_sdr
from mossformer2.models.config import tiny_test_config

SR = 16000


def _sdr_db(estimate: np.ndarray, reference: np.ndarray) -> float:
    return float(si_sdr(torch.from_numpy(estimate).double(), torch.from_numpy(reference).double()).mean())


def check_padded_batch(model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    lengths = [16000, 23456, 9001, 32000]
    gen = torch.Generator().manual_seed(0)
    waves = [0.1 * torch.randn(n, generator=gen) for n in lengths]
    batch = torch.zeros(len(waves), max(lengths))
    for i, wave in enumerate(waves):
        batch[i, : len(wave)] = wave
    worst = 0.0
    # Exactness check: cuDNN's default TF32 convs round differently per shape / algorithm, so use true fp32.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            padded = model(batch.to(device), torch.tensor(lengths, device=device)).cpu()
            for i, wave in enumerate(waves):
                alone = model(wave[None].to(device)).cpu()[0]
                rel = float((padded[i, :, : len(wave)] - alone).norm() / alone.norm())
                worst = max(worst, rel)
    finally:  # the later checks run with the default setting even if this one fails
        torch.backends.cudnn.allow_tf32 = tf32
    return {"padded_batch_max_relative_error": worst, "ok": worst < 1e-4}


def check_dtypes(model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    gen = np.random.default_rng(1)
    files = [(0.1 * gen.standard_normal(n)).astype(np.float32) for n in (48000, 64000, 40000)]
    reference = Separator(model, device=str(device), batch_size=3).separate_many(files, SR)
    result: dict[str, float] = {}
    dtypes = ["bfloat16"] + (["float16"] if device.type == "cuda" else [])
    for dtype in dtypes:
        outputs = Separator(model, device=str(device), dtype=dtype, batch_size=3).separate_many(files, SR)
        result[f"{dtype}_min_si_sdr_vs_float32_db"] = min(_sdr_db(o, r) for o, r in zip(outputs, reference))
    # A random tiny model is not a separator: its outputs are small and noisy, so the bar is relative to fp32 only.
    result["ok"] = all(v > 20.0 for v in result.values())
    return result


def check_cuda_graphs(model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """``Separator(cuda_graphs=True)`` gives the eager output (fp32 and bf16) on a 25 s input (3 chunks)."""
    wave = (0.1 * np.random.default_rng(3).standard_normal(25 * SR)).astype(np.float32)
    result: dict[str, float] = {}
    for dtype in ("float32", "bfloat16"):
        eager = Separator(model, device=str(device), dtype=dtype, batch_size=2).separate(wave, SR)
        sep = Separator(model, device=str(device), dtype=dtype, batch_size=2, cuda_graphs=True)
        graphed = sep.separate(wave, SR)
        again = sep.separate(wave, SR)  # replays the captured graphs
        result[f"{dtype}_graph_vs_eager_db"] = _sdr_db(graphed, eager)
        result[f"{dtype}_replay_max_abs_diff"] = float(np.abs(again - graphed).max())
        result[f"{dtype}_graphs_captured"] = len(sep.graphs.captured_shapes) if sep.graphs is not None else 0
    # A failed capture leaves the runner eager: then the outputs match trivially, so require captured graphs.
    result["ok"] = all(result[f"{d}_graphs_captured"] > 0 and result[f"{d}_graph_vs_eager_db"] > 60.0
                       and result[f"{d}_replay_max_abs_diff"] == 0.0 for d in ("float32", "bfloat16"))
    return result


def check_compiled(model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """The ``Separator(compile_layers=True)`` on a copy of the network (``MossFormer2.compile_layers``: shifted-sum
    convs of stored inputs on CUDA, with CUDA graphs there) against the eager fp32 Separator: a 25 s input (3
    chunks, one batch: the static graph), then a 13 s one (2 chunks: the dynamic-shape graph that every later
    shape uses). fp32 close to eager, bf16 (CUDA only; compiled bf16 does not finish on the CPU) within the 30 dB
    bar, for both."""
    waves = {"": (0.1 * np.random.default_rng(4).standard_normal(25 * SR)).astype(np.float32)}
    waves["second_shape_"] = waves[""][: 13 * SR]
    graphs = device.type == "cuda"
    eager = Separator(model, device=str(device), batch_size=4)
    references = {name: eager.separate(wave, SR) for name, wave in waves.items()}
    result: dict[str, float] = {}
    for dtype in ("float32", "bfloat16") if device.type == "cuda" else ("float32",):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="compile_layers .* is meant for CUDA")  # the CPU dry run
            sep = Separator(copy.deepcopy(model), device=str(device), dtype=dtype, batch_size=4, cuda_graphs=graphs,
                            compile_layers=True)
        for name, wave in waves.items():
            start = time.perf_counter()
            out = sep.separate(wave, SR)  # compiles (and captures) for its shape
            result[f"{dtype}_{name}first_call_s"] = time.perf_counter() - start
            result[f"{dtype}_{name}compiled_vs_eager_float32_db"] = _sdr_db(out, references[name])
    bars = {"float32": 60.0, "bfloat16": 30.0}
    result["ok"] = all(value > bars[key.split("_")[0]] for key, value in result.items() if key.endswith("_db"))
    return result


def check_long_file(model: torch.nn.Module, device: torch.device, minutes: float, dtype: str = "float32",
                    batch_size: int = 4, cuda_graphs: bool = False, compile_layers: bool = False) -> dict[str, float]:
    samples = int(minutes * 60 * SR)
    t = np.arange(samples, dtype=np.float32) / SR
    wave = (0.1 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 0.5 * t)
            + 0.05 * np.random.default_rng(2).standard_normal(samples).astype(np.float32)).astype(np.float32)
    with peak_memory(device) as memory:
        sep = Separator(copy.deepcopy(model) if compile_layers else model, device=str(device), dtype=dtype,
                        chunk_seconds=10.0, overlap_seconds=2.0, batch_size=batch_size, cuda_graphs=cuda_graphs,
                        compile_layers=compile_layers)
        if compile_layers:  # compile (and capture) for every chunk-batch shape of this file outside the timing
            sep.separate(wave, SR)
        start = time.perf_counter()
        out = sep.separate(wave, SR)
        seconds = time.perf_counter() - start
    ok = out.shape == (model.config.num_spks, samples) and bool(np.isfinite(out).all())
    return {"minutes": minutes, "dtype": dtype, "batch_size": batch_size, "cuda_graphs": cuda_graphs,
            "compile_layers": compile_layers,
            "seconds": seconds, "rtf": seconds / (minutes * 60),
            "peak_device_mib" if device.type == "cuda" else "peak_rss_mib": memory["peak_mib"],
            # a CPU's peak RSS cannot always be reset: it then stays the process's peak
            "peak_reset": bool(memory.get("rss_reset", 1.0)), "ok": ok}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny random model (CPU dry run)")
    parser.add_argument("--checkpoint", help="weights (default: random full model, or the tiny one)")
    parser.add_argument("--minutes", type=float, default=60.0, help="long-file length")
    parser.add_argument("--long-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--long-batch-size", type=int, default=4)
    parser.add_argument("--long-cuda-graphs", action="store_true")
    parser.add_argument("--long-compile", action="store_true", help="the long file on MossFormer2.compile_layers")
    parser.add_argument("--checks", default="padded_batch,dtypes,cuda_graphs",
                        help="comma list of padded_batch, dtypes, cuda_graphs (CUDA only), compiled")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.checkpoint:
        model = load_model(args.checkpoint, device=device)
    else:
        torch.manual_seed(0)
        model = build_model(tiny_test_config() if args.tiny else MossFormer2Config())
    model = model.to(device).eval()
    report: dict = {"device": str(device), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    available = {"padded_batch": check_padded_batch, "dtypes": check_dtypes, "compiled": check_compiled}
    if device.type == "cuda":
        available["cuda_graphs"] = check_cuda_graphs
    wanted = [name for name in args.checks.split(",") if name]
    unknown = sorted(set(wanted) - {"padded_batch", "dtypes", "cuda_graphs", "compiled"})
    if unknown:
        parser.error(f"unknown checks {unknown}")
    for name in wanted:
        if name not in available:
            print(f"{name}: skipped: CUDA only", file=sys.stderr, flush=True)
    checks = [(name, available[name]) for name in wanted if name in available]
    for name, check in checks:
        try:
            report[name] = check(model, device)
        except Exception as err:  # report the failure and go on with the other checks
            report[name] = {"error": f"{type(err).__name__}: {err}", "ok": False}
    print(json.dumps(report, indent=2), file=sys.stderr, flush=True)  # stdout stays one JSON object
    report["long_file"] = check_long_file(model, device, args.minutes, args.long_dtype, args.long_batch_size,
                                          args.long_cuda_graphs, args.long_compile)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0 if all(part["ok"] for part in report.values() if isinstance(part, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())

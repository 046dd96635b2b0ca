"""MossFormer2 speed and memory benchmark: inference backends, batch throughput, chunked Separator, training step.

Prints a table and writes JSON. Every optimised variant is compared with the baseline in the same run: eager
PyTorch fp32, which is numerically the official network (fixture equivalence, tests/models/test_model.py). Variants:
eager bf16 autocast, torch.compile (fp32; on CUDA also bf16 and ``mode="reduce-overhead"``, i.e. CUDA graphs for
the fixed shape), ONNX Runtime (CPU, or the CUDA provider when onnxruntime has it) and, on the CPU, opt-in dynamic
int8 quantisation of the Linear layers. Each output is scored against the eager fp32 output (max abs error,
relative error, SI-SDR in dB). ``--variants`` refuses unknown names; variants for another device type are skipped
with a line that says so.

    python benchmarks/benchmark.py --quick                      # CI size: tiny model, 1-2 minutes on 2 cores
    python benchmarks/benchmark.py --threads 2 --json cpu.json  # full model on the CPU
    python benchmarks/benchmark.py --device cuda --json gpu.json

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the process peak RSS (VmHWM), reset before
each measurement through ``/proc/self/clear_refs`` where the kernel allows it (else it is the process-wide peak).
For the CUDA graph rows it covers the capture as well as the replays: the graph's private memory pool is allocated
while capturing. Separator rows time one run (``elapsed_s``, the first call's set-up included), not a median.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mossformer2 import MossFormer2, MossFormer2Config, build_model, load_model
from mossformer2.losses import pit_si_sdr_loss, si_sdr
from mossformer2.models import convolution
from mossformer2.models.config import tiny_test_config
from mossformer2.models.mossformer import COMPILE_LAYER_MODES
from mossformer2.separation.cuda_graphs import CudaGraphModel

GRAPH_VARIANTS = {"graph": None, "graph-bf16": torch.bfloat16, "graph-fp16": torch.float16}
DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# The model cast to bf16 (model.bfloat16(), bf16 input) instead of autocast; graph variants on CUDA only.
BF16_WEIGHT_VARIANTS = ("bf16-weights", "graph-bf16-weights", "regional-compile-graph-bf16-weights")
VARIANTS = ("tf32", "bf16", "fp16", "graph", "graph-bf16", "graph-fp16", "compile", "compile-bf16",
            "compile-cudagraphs", "regional-compile-graph-bf16", "bf16-weights", "graph-bf16-weights",
            "regional-compile-graph-bf16-weights", "onnxruntime", "int8")
# Variants run on one device type only; the others run anywhere. compile-bf16: a compiled bf16 forward does not
# finish on the CPU (torch 2.13, tiny model, > 400 s; see RESULTS.md).
CUDA_ONLY = ("tf32", "fp16", "graph", "graph-bf16", "graph-fp16", "compile-bf16", "compile-cudagraphs",
             "regional-compile-graph-bf16", "graph-bf16-weights", "regional-compile-graph-bf16-weights")
DEVICE_ONLY = {"int8": "cpu", **dict.fromkeys(CUDA_ONLY, "cuda")}
SECTIONS = ("latency", "throughput", "separator", "training")


@dataclass
class Settings:
    device: torch.device
    quick: bool
    seconds: float  # latency input length
    repeats: int
    warmup: int
    batch: int  # throughput batch
    separator_seconds: float
    train_seconds: float
    train_batches: list[int]
    variants: list[str]
    skipped_variants: list[str] = field(default_factory=list)  # not for this device type
    time_budget_s: float | None = None
    compile_layout: str = "shifted_sum_stored"  # the compiled-layers variants' depth-wise conv form (--compile-layout)
    compile_mode: str | None = None  # their torch.compile mode (--compile-mode)
    started: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    save: Callable[[], None] | None = None  # called after each row, so an interrupted run keeps what it measured

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.save is not None:
            self.save()

    def out_of_time(self) -> bool:
        return self.time_budget_s is not None and time.perf_counter() - self.started > self.time_budget_s


# -- measurement helpers ---------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> tuple[list[float], Any]:
    """Wall times (s) of ``repeats`` calls after ``warmup`` calls; returns (times, last result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, result


def _read_vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Yield a dict that holds ``peak_mib`` (and ``rss_reset``) after the block."""
    stats: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            stats["rss_reset"] = 1.0
        except OSError:
            stats["rss_reset"] = 0.0
    yield stats
    if device.type == "cuda":
        stats["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        stats["peak_mib"] = _read_vm_hwm_mib()


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Error of ``out`` against the fp32 eager output ``ref`` (both ``[B, S, T]``)."""
    out, ref = out.detach().float().cpu(), ref.detach().float().cpu()
    diff = out - ref
    return {
        "max_abs_err": float(diff.abs().max()),
        "rel_err": float(diff.norm() / ref.norm().clamp_min(1e-12)),
        "si_sdr_vs_fp32_db": float(si_sdr(out, ref).mean()),
    }


@contextlib.contextmanager
def tf32_matmuls() -> Iterator[None]:
    """Let float32 matmuls use the tensor cores' TF32 mode (cuDNN convs do by default)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# -- model and inputs ------------------------------------------------------------------------------------------


def make_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.checkpoint:
        return load_model(args.checkpoint).eval()
    config = tiny_test_config() if args.quick else MossFormer2Config()
    torch.manual_seed(0)
    return build_model(config).eval()


def speech_like(batch: int, samples: int, seed: int = 0) -> torch.Tensor:
    """Noise shaped like speech level (-25 dBFS); the timing does not depend on the content."""
    generator = torch.Generator().manual_seed(seed)
    return 0.056 * torch.randn(batch, samples, generator=generator)


# -- benchmark sections ----------------------------------------------------------------------------------------


def bench_inference(model: torch.nn.Module, s: Settings, batch: int, section: str) -> None:
    """Every requested variant on one ``[batch, seconds]`` input; the first row is the eager fp32 baseline."""
    sr = model.config.sample_rate
    audio_seconds = batch * s.seconds
    wave = speech_like(batch, int(s.seconds * sr))
    wave_dev = wave.to(s.device)
    reference: torch.Tensor | None = None

    def run(name: str, fn: Callable[[], torch.Tensor], setup_s: float = 0.0,
            setup: Callable[[], None] | None = None, **info: Any) -> None:
        """Time ``fn``; ``setup`` runs first inside the peak-memory block and adds to ``setup_s``."""
        nonlocal reference
        with peak_memory(s.device) as mem:
            if setup is not None:
                start = time.perf_counter()
                setup()
                setup_s += time.perf_counter() - start
            times, out = time_call(fn, s.device, s.repeats, s.warmup)
        median = statistics.median(times)
        row = {"section": section, "variant": name, "batch": batch, "audio_s": audio_seconds,
               "median_s": median, "min_s": min(times), "times_s": times, "rtf": median / audio_seconds,
               "setup_s": setup_s, **mem, **info}
        if reference is None:
            reference = out.detach().float().cpu()
        else:
            row.update(compare(out, reference))
        s.add(row)
        print(f"  {section:<10} {name:<28} median {median:8.3f} s  RTF {row['rtf']:.4f}  "
              f"peak {row['peak_mib']:8.0f} MiB" + (f"  SI-SDR vs fp32 {row['si_sdr_vs_fp32_db']:.1f} dB"
                                                     if "si_sdr_vs_fp32_db" in row else ""), flush=True)

    def eager(m: torch.nn.Module, dtype: torch.dtype | None, x: torch.Tensor = wave_dev) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            with torch.inference_mode(), autocast(s.device, dtype):
                return m(x)
        return fn

    def inference(graphed: CudaGraphModel, x: torch.Tensor = wave_dev) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            with torch.inference_mode():  # with gradients enabled the runner would fall back to eager
                return graphed(x)
        return fn

    def run_graphed(name: str, m: torch.nn.Module, dtype: torch.dtype | None, x: torch.Tensor) -> None:
        """Time the replays of ``m`` captured in CUDA graphs; setup: compiling (compiled layers) and capturing.
        The capture runs inside the peak-memory block: it allocates the graph's private pool, which replays reuse
        without allocating, so a peak taken around the replays alone would leave the graph's activations out."""
        graphed = CudaGraphModel(m, dtype)
        run(name, inference(graphed, x), setup=lambda: capture(graphed, x, s.device))

    run("eager fp32 (baseline)", eager(model, None))
    for variant in s.variants:
        if s.out_of_time():
            print(f"  {section:<10} {variant:<28} skipped: time budget spent", flush=True)
            continue
        try:
            if variant == "tf32":
                with tf32_matmuls():
                    run("eager fp32 + TF32 matmuls", eager(model, None))
            elif variant in GRAPH_VARIANTS or variant == "regional-compile-graph-bf16":
                regional = variant not in GRAPH_VARIANTS
                dtype = torch.bfloat16 if regional else GRAPH_VARIANTS[variant]
                run_graphed(("compiled layers + " if regional else "") + f"CUDA graph {DTYPE_NAMES[dtype]}",
                            compile_regions(copy.deepcopy(model), s) if regional else model, dtype, wave_dev)
            elif variant == "bf16":
                run("eager bf16 autocast", eager(model, torch.bfloat16))
            elif variant in BF16_WEIGHT_VARIANTS:
                # The whole network in bf16 (weights and activations, no autocast): no per-call casts, and the
                # elementwise ops that fp32 parameters promote to fp32 under autocast stay bf16.
                start = time.perf_counter()
                halved = copy.deepcopy(model).bfloat16()
                if variant == "regional-compile-graph-bf16-weights":
                    compile_regions(halved, s)
                wave_half = wave_dev.bfloat16()
                if variant == "bf16-weights":
                    run("eager bf16 weights", eager(halved, None, wave_half), setup_s=time.perf_counter() - start)
                else:
                    run_graphed(("compiled layers + " if "compile" in variant else "") + "CUDA graph, bf16 weights",
                                halved, None, wave_half)
                del halved
            elif variant == "fp16":
                run("eager fp16 autocast", eager(model, torch.float16))
            elif variant in ("compile", "compile-bf16", "compile-cudagraphs"):
                mode = "reduce-overhead" if variant == "compile-cudagraphs" else None
                dtype = torch.bfloat16 if variant != "compile" else None
                compiled = torch.compile(model, mode=mode, dynamic=False)
                start = time.perf_counter()
                eager(compiled, dtype)()  # compilation happens on the first call
                _sync(s.device)
                run(f"torch.compile {'fp32' if dtype is None else 'bf16'}"
                    + (" cudagraphs" if mode else ""), eager(compiled, dtype), setup_s=time.perf_counter() - start)
            elif variant == "onnxruntime":
                run_onnx(model, s, wave, run)
            elif variant == "int8":
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.ao's migration notice
                    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu(),
                                                                       {torch.nn.Linear}, dtype=torch.qint8)
                run("dynamic int8 (Linear)", eager(quantized, None), setup_s=time.perf_counter() - start)
            else:  # main() refuses unknown names; this keeps a new name from being dropped without a row
                raise ValueError(f"unknown variant {variant!r}")
        except Exception as err:  # report a variant that cannot run here instead of aborting the benchmark
            print(f"  {section:<10} {variant:<28} FAILED: {type(err).__name__}: {err}", flush=True)
            s.add({"section": section, "variant": variant, "batch": batch,
                   "error": f"{type(err).__name__}: {err}"})


def capture(graphed: CudaGraphModel, x: torch.Tensor, device: torch.device) -> None:
    """First call of ``graphed``: compiles (compiled layers), then captures. On CUDA a failed capture leaves the
    runner eager (it warns), and timing that under a graph label would be wrong: raise instead. On the CPU the
    runner is eager by design, which lets the tests run this path there."""
    with torch.inference_mode():
        graphed(x)
    if device.type == "cuda" and not graphed.captured_shapes:
        raise RuntimeError("no CUDA graph was captured (see the warning above); the calls would run eagerly")
    _sync(device)


def run_onnx(model: torch.nn.Module, s: Settings, wave: torch.Tensor,
             run: Callable[..., None]) -> None:
    import onnxruntime as ort

    from mossformer2.export import OnnxRuntimeModel, export_onnx

    providers = ["CPUExecutionProvider"]
    if s.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_onnx(copy.deepcopy(model).cpu(), Path(tmp) / "model.onnx", dynamic_length=True,
                           example=speech_like(2, min(wave.shape[-1], model.config.sample_rate)))
        threads = torch.get_num_threads() if s.device.type == "cpu" else None
        runtime = OnnxRuntimeModel(path, providers=providers, num_threads=threads)
        setup = time.perf_counter() - start
        run(f"onnxruntime ({providers[0].replace('ExecutionProvider', '')})", lambda: runtime(wave), setup_s=setup)


def profile_forward(model: torch.nn.Module, wave: torch.Tensor, path: str | Path,
                    dtypes: tuple[torch.dtype | None, ...] = (None, torch.bfloat16), title: str = "") -> None:
    """Kernel table of one forward of ``wave`` per precision in ``dtypes`` (torch.profiler, sorted by device time on
    a GPU, by CPU time on the CPU), written to ``path`` after each precision. The forward before the profiled one
    warms up (and compiles a compiled model)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = wave.device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    parts = []
    for dtype in dtypes:
        label = f"{title}{DTYPE_NAMES[dtype]}, batch {wave.shape[0]}"
        try:
            with torch.inference_mode(), autocast(wave.device, dtype):
                model(wave)  # warm-up
                _sync(wave.device)
                with profile(activities=activities) as prof:
                    model(wave)
                    _sync(wave.device)
        except Exception as err:  # the profile is a diagnostic: never lose the benchmark to it
            parts.append(f"== {label}: failed: {type(err).__name__}: {err}\n")
        else:
            events = prof.key_averages()
            if cuda:
                kernels = sum(e.count for e in events
                              if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
                heading = f"{kernels} device events per forward"
            else:
                heading = f"{sum(e.count for e in events)} operator events per forward"
            table = events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40,
                                 max_name_column_width=70)
            parts.append(f"== {label}: {heading} ==\n{table}\n")
            print(f"  profile    {label}: {heading}", flush=True)
        Path(path).write_text("\n".join(parts))


def compile_regions(model: MossFormer2, s: Settings) -> MossFormer2:
    """``model.compile_layers`` for one static shape, with the run's conv layout and compile mode."""
    return model.compile_layers(dynamic=False, layout=s.compile_layout, mode=s.compile_mode)


def profile_compiled(model: MossFormer2, s: Settings, path: str | Path) -> None:
    """Kernel tables of the compiled-layers model (``MossFormer2.compile_layers``, no CUDA graph, so that each
    generated kernel shows) at batch 1 and at the throughput batch: bf16 on a GPU (its best variant), fp32 on the
    CPU (where a compiled bf16 forward does not finish). Written to ``path`` (batch 1) and ``<path>.batchN``."""
    compiled = compile_regions(copy.deepcopy(model), s)
    dtypes = (torch.bfloat16,) if s.device.type == "cuda" else (None,)
    samples = int(s.seconds * model.config.sample_rate)
    for batch, out in ((1, Path(path)), (s.batch, Path(f"{path}.batch{s.batch}"))):
        profile_forward(compiled, speech_like(batch, samples).to(s.device), out, dtypes, title="compiled layers, ")
    del compiled


def bench_separator(model: torch.nn.Module, s: Settings) -> None:
    """A long recording through the chunked Separator (10 s chunks, 2 s overlap): RTF and peak memory."""
    from mossformer2.separation import Separator

    sr = model.config.sample_rate
    wave = speech_like(1, int(s.separator_seconds * sr))[0].numpy()
    dtypes = ["float32", "bfloat16"] if "bf16" in s.variants else ["float32"]
    runs = [(dtype, False) for dtype in dtypes]
    if s.device.type == "cuda" and any(v.startswith("graph") for v in s.variants):
        runs += [(dtype, True) for dtype in dtypes]
    for dtype, graphs in runs:
        if s.out_of_time():
            continue
        name = f"Separator {dtype}" + (" + CUDA graphs" if graphs else "")
        separator = Separator(model, device=str(s.device), dtype=dtype, chunk_seconds=10.0, overlap_seconds=2.0,
                              batch_size=4 if s.device.type == "cuda" else 1, cuda_graphs=graphs)
        try:
            with peak_memory(s.device) as mem:
                start = time.perf_counter()
                out = separator.separate(wave, sr)
                _sync(s.device)
                elapsed = time.perf_counter() - start
        except Exception as err:  # report it and go on with the other variants
            print(f"  separator  {name:<28} FAILED: {type(err).__name__}: {err}", flush=True)
            s.add({"section": "separator", "variant": name, "error": f"{type(err).__name__}: {err}"})
            continue
        assert out.shape == (model.config.num_spks, wave.shape[-1])
        # One run, its first call's set-up (cuDNN algorithm choice, graph capture) included: not a median.
        row = {"section": "separator", "variant": name, "audio_s": s.separator_seconds,
               "elapsed_s": elapsed, "rtf": elapsed / s.separator_seconds, **mem}
        print(f"  separator  {row['variant']:<28} {elapsed:8.2f} s for {s.separator_seconds:.0f} s audio  "
              f"RTF {row['rtf']:.4f}  peak {row['peak_mib']:8.0f} MiB", flush=True)
        s.add(row)


def bench_training(model: torch.nn.Module, s: Settings) -> None:
    """One Adam step (forward, PIT SI-SDR loss, backward, step) per variant and batch: time and peak memory."""
    samples = int(s.train_seconds * model.config.sample_rate)
    for batch in s.train_batches:
        mix = speech_like(batch, samples, seed=1).to(s.device)
        sources = torch.stack([speech_like(batch, samples, seed=2 + k)
                               for k in range(model.config.num_spks)], dim=1).to(s.device)
        for dtype_name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            if dtype is not None and "bf16" not in s.variants:
                continue
            for checkpointing in (False, True):
                if s.out_of_time():
                    continue
                name = f"train {dtype_name}" + (" + act. ckpt" if checkpointing else "")
                try:
                    s.add(_bench_train_variant(model, s, mix, sources, dtype, checkpointing, name))
                except Exception as err:  # as for inference: report the variant and go on with the others
                    error = (f"out of memory: {str(err).splitlines()[0]}" if isinstance(err, torch.OutOfMemoryError)
                             else f"{type(err).__name__}: {err}")
                    print(f"  training   {name:<28} batch {batch}: FAILED: {error}", flush=True)
                    s.add({"section": "training", "variant": name, "batch": batch, "error": error})
                if s.device.type == "cuda":
                    torch.cuda.empty_cache()


def _bench_train_variant(model: torch.nn.Module, s: Settings, mix: torch.Tensor, sources: torch.Tensor,
                         dtype: torch.dtype | None, checkpointing: bool, name: str) -> dict[str, Any]:
    """Time one training variant at the batch of ``mix`` ``[B, T]``."""
    train_model = copy.deepcopy(model).to(s.device).train()
    train_model.set_activation_checkpointing(checkpointing)
    step = _train_step(train_model, mix, sources, dtype)
    batch = mix.shape[0]
    with peak_memory(s.device) as mem:
        times, _ = time_call(step, s.device, max(1, s.repeats - 1), 1)
    median = statistics.median(times)
    audio = batch * s.train_seconds
    row = {"section": "training", "variant": name, "batch": batch, "audio_s": audio,
           "median_s": median, "audio_s_per_s": audio / median, **mem}
    per_sample = ""
    # CUDA only: the CPU peak is the process's RSS (torch, onnxruntime, the model, heap that glibc keeps), which
    # says nothing per sample; on CUDA the activations dominate the allocated peak.
    if s.device.type == "cuda":
        row["peak_mib_per_sample"] = mem["peak_mib"] / batch
        per_sample = f" ({row['peak_mib_per_sample']:.0f} per sample)"
    print(f"  training   {name:<28} batch {batch:>2} median {median:8.3f} s/step  {audio / median:7.2f} audio-s/s  "
          f"peak {mem['peak_mib']:8.0f} MiB{per_sample}", flush=True)
    return row


def _train_step(model: torch.nn.Module, mix: torch.Tensor, sources: torch.Tensor,
                dtype: torch.dtype | None) -> Callable[[], torch.Tensor]:
    """A closure running one Adam step of ``model`` on ``mix [B, T]`` / ``sources [B, S, T]``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(mix.device, dtype):
            est = model(mix)
        loss, _ = pit_si_sdr_loss(est.float(), sources)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


# -- report ----------------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform(), "threads": torch.get_num_threads()}
    with contextlib.suppress(OSError):
        cpu = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("model name")]
        info["cpu"] = f"{cpu[0]} x{len(cpu)}" if cpu else platform.processor()
    with contextlib.suppress(OSError):
        info["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda_depthwise"] = convolution.CUDA_DEPTHWISE_LAYOUT
    with contextlib.suppress(ImportError):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    return info


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'section':<10} {'variant':<30} {'batch':>5} {'audio s':>8} {'median s':>9} {'RTF':>8} " \
             f"{'peak MiB':>9} {'SI-SDR vs fp32':>14} {'rel err':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['section']:<10} {r['variant']:<30} failed: {r['error'][:80]}")
            continue
        sisdr = f"{r['si_sdr_vs_fp32_db']:.1f} dB" if "si_sdr_vs_fp32_db" in r else "-"
        rel = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
        rtf = f"{r['rtf']:.4f}" if "rtf" in r else f"{r['audio_s_per_s']:.2f}a/s"
        seconds = f"{r['median_s']:.3f}" if "median_s" in r else f"{r['elapsed_s']:.3f}*"
        print(f"{r['section']:<10} {r['variant']:<30} {r.get('batch', 1):>5} {r['audio_s']:>8.1f} "
              f"{seconds:>9} {rtf:>8} {r['peak_mib']:>9.0f} {sisdr:>14} {rel:>9}")
    if any("elapsed_s" in r for r in rows):
        print("* one run, its first call's set-up included (not a median)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI size: tiny random model, short inputs")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--checkpoint", default=None, help="weights to load (default: random init of the config)")
    parser.add_argument("--seconds", type=float, default=None, help="latency input length (default 4; quick 1)")
    parser.add_argument("--batch", type=int, default=None, help="throughput batch (default 16; quick 4)")
    parser.add_argument("--separator-seconds", type=float, default=None,
                        help="length of the long file for the Separator (default 300; quick 12)")
    parser.add_argument("--train-seconds", type=float, default=None, help="training segment (default 4; quick 0.5)")
    parser.add_argument("--train-batches", default="1", help="comma list of training batch sizes (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 3; quick 2)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma list of optimised variants beside the eager fp32 baseline (default: all: "
                             f"{', '.join(VARIANTS)}; CPU only: int8; CUDA only: {', '.join(CUDA_ONLY)})")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--json", default=None, help="write the results here (rewritten after each section)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds after which remaining variants are skipped (rows so far are kept)")
    parser.add_argument("--profile", default=None,
                        help="CUDA only: write the kernels of one batch-1 forward (fp32 and bf16) to this text file")
    parser.add_argument("--profile-compiled", default=None,
                        help="write the kernels of one forward of the compiled-layers model (bf16 on CUDA, fp32 on "
                             "the CPU) at batch 1 to this file, and at the throughput batch to <file>.batchN")
    parser.add_argument("--cuda-depthwise", default=None, choices=convolution.CUDA_DEPTHWISE_LAYOUTS,
                        help="CUDA only: how depth-wise convs run (models.convolution.CUDA_DEPTHWISE_LAYOUT; "
                             "shifted_sum is meant for the compiled variants, which set their own layout and "
                             "weight layout through compile_layers; this global one leaves the weights as they are)")
    parser.add_argument("--compile-layout", default="shifted_sum_stored",
                        choices=[name for name in convolution.SHIFTED_SUM_INPUTS],
                        help="depth-wise conv form of the compiled-layers variants (MossFormer2.compile_layers): "
                             "each conv input stored, then copied padded (default); written padded by its producer "
                             "(shifted_sum_realized); or its producer fused into every tap's read (shifted_sum)")
    parser.add_argument("--compile-mode", default=None, choices=[m for m in COMPILE_LAYER_MODES if m],
                        help="torch.compile mode of the compiled-layers variants (default: torch's default); "
                             "max-autotune-no-cudagraphs tunes the matrix-multiply kernels at compile time")
    args = parser.parse_args(argv)
    for option, names, known in (("--variants", args.variants, VARIANTS), ("--sections", args.sections, SECTIONS)):
        unknown = [name for name in names.split(",") if name and name not in known]
        if unknown:
            parser.error(f"{option}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from mossformer2.utils import atomic_write_text, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cuda_depthwise:
        convolution.CUDA_DEPTHWISE_LAYOUT = args.cuda_depthwise
    device = resolve_device(args.device)
    quick = args.quick
    variants, skipped = [], []
    for variant in (v for v in args.variants.split(",") if v):
        (variants if DEVICE_ONLY.get(variant, device.type) == device.type else skipped).append(variant)
    s = Settings(device=device, quick=quick,
                 seconds=args.seconds or (1.0 if quick else 4.0),
                 repeats=args.repeats or (2 if quick else 3), warmup=args.warmup,
                 batch=args.batch or (4 if quick else 16),
                 separator_seconds=args.separator_seconds or (12.0 if quick else 300.0),  # quick: 2 chunks
                 train_seconds=args.train_seconds or (0.5 if quick else 4.0),
                 train_batches=[int(b) for b in args.train_batches.split(",") if b],
                 variants=variants, skipped_variants=skipped,
                 time_budget_s=args.time_budget, started=time.perf_counter(),
                 compile_layout=args.compile_layout, compile_mode=args.compile_mode)
    sections = [x for x in args.sections.split(",") if x]
    model = make_model(args).to(device)
    info = machine_info(device)
    print(f"device {device} | {info.get('gpu', info.get('cpu'))} | threads {info['threads']} | "
          f"model {'tiny' if quick and not args.checkpoint else 'full'} "
          f"({sum(p.numel() for p in model.parameters()):,} params)", flush=True)
    for variant in skipped:
        print(f"  {variant:<39} skipped: {DEVICE_ONLY[variant].upper()} only", flush=True)
    rows = s.rows
    result = {"machine": info, "settings": {k: str(v) if isinstance(v, torch.device) else v
                                            for k, v in vars(s).items() if k not in ("rows", "save")},
              "config": model.config.to_dict(), "rows": rows}
    if args.json:
        s.save = lambda: atomic_write_text(args.json, json.dumps(result, indent=2))
    if args.profile and device.type == "cuda":
        profile_forward(model, speech_like(1, int(s.seconds * model.config.sample_rate)).to(device), args.profile)
    if args.profile_compiled:
        profile_compiled(model, s, args.profile_compiled)
    benches: dict[str, Callable[[], None]] = {
        "latency": lambda: bench_inference(model, s, 1, "latency"),
        "throughput": lambda: bench_inference(model, s, s.batch, "throughput"),
        "separator": lambda: bench_separator(model, s),
        "training": lambda: bench_training(model, s),
    }
    for section in sections:
        benches[section]()
    print_table(rows)
    if args.json:
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    from mossformer2.utils import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()  # as the mossformer2 command does: large CPU tensors reuse warm heap pages
    main()

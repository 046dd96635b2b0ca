"""The benchmark script runs end to end in its CI-size mode and reports consistent numbers (no timing asserts)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import warnings
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO_ROOT, load_script


def _load_benchmark(name: str = "benchmark"):
    return load_script(f"benchmarks/{name}.py", f"mossformer2_{name}")


def test_quick_benchmark_runs_and_writes_json(tmp_path, capsys):
    benchmark = _load_benchmark()
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        result = benchmark.main(["--quick", "--threads", "1", "--sections", "latency,separator,training",
                                 "--variants", "onnxruntime,int8,bf16-weights", "--repeats", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    rows = {(r["section"], r["variant"]): r for r in result["rows"]}
    assert not [r for r in result["rows"] if "error" in r]

    baseline = rows[("latency", "eager fp32 (baseline)")]
    assert baseline["median_s"] > 0 and baseline["rtf"] == baseline["median_s"] / baseline["audio_s"]
    assert "si_sdr_vs_fp32_db" not in baseline  # the reference itself

    onnx = rows[("latency", "onnxruntime (CPU)")]
    assert onnx["si_sdr_vs_fp32_db"] > 40 and onnx["rel_err"] < 1e-3 and onnx["setup_s"] > 0
    half = rows[("latency", "eager bf16 weights")]  # model.bfloat16(): close to fp32 (the position tables stay exact)
    assert half["si_sdr_vs_fp32_db"] > 30
    int8 = rows[("latency", "dynamic int8 (Linear)")]
    assert math.isfinite(int8["si_sdr_vs_fp32_db"]) and int8["rel_err"] > 0  # lossy, but measured

    separator = rows[("separator", "Separator float32")]
    assert separator["audio_s"] == 12.0 and separator["peak_mib"] > 0
    assert separator["elapsed_s"] > 0 and "median_s" not in separator  # one run: not labelled a median
    training = [r for r in result["rows"] if r["section"] == "training"]
    assert [r["variant"] for r in training] == ["train fp32", "train fp32 + act. ckpt"]
    assert all(r["audio_s_per_s"] > 0 for r in training)
    assert not [r for r in training if "peak_mib_per_sample" in r]  # the CPU peak is the process's RSS

    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == len(result["rows"]) and saved["config"]["encoder_embedding_dim"] == 16
    printed = capsys.readouterr().out
    assert "eager fp32 (baseline)" in printed and "SI-SDR vs fp32" in printed
    assert "* one run, its first call's set-up included (not a median)" in printed


def test_unknown_variants_are_refused_and_device_only_ones_skipped(capsys):
    benchmark = _load_benchmark()
    for option, value in (("--variants", "onnx,int-8,bf16"), ("--sections", "latency,speed")):
        with pytest.raises(SystemExit):
            benchmark.parse_args([option, value])
        err = capsys.readouterr().err
        assert "unknown" in err and "known: " in err
        assert ("onnx, int-8 (known: tf32," in err) if option == "--variants" else ("unknown speed" in err)
    result = benchmark.main(["--quick", "--sections", "", "--variants", "graph,int8,compile-bf16"])
    assert result["settings"]["variants"] == ["int8"]
    assert result["settings"]["skipped_variants"] == ["graph", "compile-bf16"]
    printed = capsys.readouterr().out
    assert [line.split() for line in printed.splitlines() if "skipped" in line] == [
        ["graph", "skipped:", "CUDA", "only"], ["compile-bf16", "skipped:", "CUDA", "only"]]


def _graph_variant_on_cpu(benchmark, monkeypatch):
    """Let the CUDA graph variants run on the CPU, where CudaGraphModel runs the model eagerly by design."""
    monkeypatch.setattr(benchmark, "DEVICE_ONLY", {})
    threads = torch.get_num_threads()
    try:
        return benchmark.main(["--quick", "--threads", "1", "--sections", "latency", "--variants", "graph",
                               "--repeats", "1", "--warmup", "1"])
    finally:
        torch.set_num_threads(threads)


def test_graph_rows_measure_memory_around_the_capture(monkeypatch):
    """The capture (which allocates the graph's private pool on CUDA) runs inside the peak-memory block."""
    benchmark = _load_benchmark()
    events = []
    real_peak_memory = benchmark.peak_memory

    @contextlib.contextmanager
    def recording_peak_memory(device):
        events.append("measure")
        with real_peak_memory(device) as mem:
            yield mem
        events.append("end")

    class RecordingGraphModel(benchmark.CudaGraphModel):
        def __call__(self, *args, **kwargs):
            events.append("call")
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(benchmark, "peak_memory", recording_peak_memory)
    monkeypatch.setattr(benchmark, "CudaGraphModel", RecordingGraphModel)
    rows = _graph_variant_on_cpu(benchmark, monkeypatch)["rows"]
    assert [r["variant"] for r in rows] == ["eager fp32 (baseline)", "CUDA graph fp32"] and "error" not in rows[1]
    # baseline block; then the graph's block: capture, one warm-up, one timed call
    assert events == ["measure", "end", "measure", "call", "call", "call", "end"]
    assert rows[1]["setup_s"] > 0 and rows[1]["si_sdr_vs_fp32_db"] > 60


def test_graph_rows_without_a_captured_graph_are_errors(monkeypatch):
    """On CUDA a failed capture leaves the runner eager: the row is an error, not eager timings under a graph label
    (simulated on the CPU by applying CUDA's rule to the eager CPU runner)."""
    benchmark = _load_benchmark()
    graphed = benchmark.CudaGraphModel(lambda x: x)
    with pytest.raises(RuntimeError, match="no CUDA graph was captured"):
        benchmark.capture(graphed, torch.zeros(1, 8), torch.device("cuda"))
    real_capture = benchmark.capture
    monkeypatch.setattr(benchmark, "capture", lambda g, x, device: real_capture(g, x, torch.device("cuda")))
    rows = _graph_variant_on_cpu(benchmark, monkeypatch)["rows"]
    assert rows[-1]["variant"] == "graph" and "no CUDA graph was captured" in rows[-1]["error"]


def test_training_failures_become_error_rows(monkeypatch):
    benchmark = _load_benchmark()
    real_variant = benchmark._bench_train_variant

    def failing_checkpointed(model, s, mix, sources, dtype, checkpointing, name):
        if checkpointing:
            raise ValueError("checkpointing broke")
        return real_variant(model, s, mix, sources, dtype, checkpointing, name)

    monkeypatch.setattr(benchmark, "_bench_train_variant", failing_checkpointed)
    threads = torch.get_num_threads()
    try:
        rows = benchmark.main(["--quick", "--threads", "1", "--sections", "training", "--variants", "",
                               "--repeats", "1"])["rows"]
    finally:
        torch.set_num_threads(threads)
    assert [(r["variant"], r.get("error")) for r in rows] == [
        ("train fp32", None), ("train fp32 + act. ckpt", "ValueError: checkpointing broke")]


def test_device_checks_dry_run_on_cpu(tmp_path, capsys):
    """benchmarks/gpu_checks.py (padded batch == alone, bf16 vs fp32, compiled layers == eager, long file) passes
    with the tiny model on CPU."""
    checks = _load_benchmark("gpu_checks")
    out = tmp_path / "checks.json"
    assert checks.main(["--device", "cpu", "--tiny", "--minutes", "0.1", "--checks",
                        "padded_batch,dtypes,compiled,cuda_graphs", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "cuda_graphs: skipped: CUDA only" in captured.err
    report = json.loads(out.read_text())
    assert json.loads(captured.out) == report  # stdout is one JSON object (an interim one came first)
    assert "cuda_graphs" not in report
    assert report["compiled"]["float32_compiled_vs_eager_float32_db"] > 60
    assert report["compiled"]["float32_second_shape_compiled_vs_eager_float32_db"] > 60  # the dynamic-shape graph
    assert report["padded_batch"]["padded_batch_max_relative_error"] < 1e-4
    assert report["dtypes"]["bfloat16_min_si_sdr_vs_float32_db"] > 20
    assert report["long_file"]["ok"] and report["long_file"]["minutes"] == 0.1
    assert report["long_file"]["peak_rss_mib"] > 0 and "peak_reset" in report["long_file"]


def test_cuda_graphs_check_fails_when_nothing_was_captured():
    """The Separator runs eagerly when no graph is captured (always on the CPU): outputs then equal eager
    trivially, and the check must not pass on that."""
    checks = _load_benchmark("gpu_checks")
    torch.manual_seed(0)
    model = checks.build_model(checks.tiny_test_config()).eval()
    result = checks.check_cuda_graphs(model, torch.device("cpu"))
    assert result["float32_graphs_captured"] == 0 and result["float32_replay_max_abs_diff"] == 0.0
    assert result["ok"] is False


def test_compile_diagnosis_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_compile_diagnosis.py probes the compiled rotary tables, then scores its first row (compiled
    layers, fp32, three 10 s items) against eager on the CPU."""
    diagnosis = _load_benchmark("gpu_compile_diagnosis")
    out = tmp_path / "diagnosis.json"
    rows = diagnosis.main(["--device", "cpu", "--tiny", "--rows", "1", "--json", str(out)])
    assert rows[0]["variant"].startswith("probe: rotary cos/sin tables, 20000 frames")
    assert rows[0]["max_abs_diff"] < 1e-3  # the CPU's compiled cos / sin are accurate
    assert diagnosis.ROWS[0].dtype == torch.float32 and diagnosis.ROWS[0].layout == "shifted_sum_stored"
    assert [row["variant"] for row in rows[1:]] == [diagnosis.ROWS[0].name]
    assert rows[1]["si_sdr_vs_eager_fp32_db"] > 60
    assert json.loads(out.read_text()) == rows


def test_cuda_depthwise_option_sets_the_layout_and_refuses_unknown_names(capsys):
    from mossformer2.models import convolution

    benchmark = _load_benchmark()
    assert benchmark.parse_args(["--cuda-depthwise", "shifted_sum"]).cuda_depthwise == "shifted_sum"
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--cuda-depthwise", "winograd"])
    assert "invalid choice" in capsys.readouterr().err
    before = convolution.CUDA_DEPTHWISE_LAYOUT
    try:
        result = benchmark.main(["--quick", "--device", "cpu", "--sections", "latency", "--variants", "",
                                 "--repeats", "1", "--cuda-depthwise", "shifted_sum"])
        assert convolution.CUDA_DEPTHWISE_LAYOUT == "shifted_sum" and result["rows"]
    finally:
        convolution.CUDA_DEPTHWISE_LAYOUT = before


def test_compile_layout_reaches_every_compiled_region(monkeypatch):
    benchmark = _load_benchmark()
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    from mossformer2 import build_model
    from mossformer2.models.config import tiny_test_config
    from mossformer2.models.convolution import ConvModule

    for flags, layout, mode in (([], "shifted_sum_stored", None),
                                (["--compile-layout", "shifted_sum"], "shifted_sum", None),
                                (["--compile-layout", "shifted_sum_realized"], "shifted_sum_realized", None),
                                (["--compile-mode", "max-autotune-no-cudagraphs"], "shifted_sum_stored",
                                 "max-autotune-no-cudagraphs")):
        calls.clear()
        result = benchmark.main(["--quick", "--device", "cpu", "--sections", "", "--variants", "", *flags])
        run = SimpleNamespace(**{key: result["settings"][key] for key in ("compile_layout", "compile_mode")})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="compile_layers.*wrong float32")  # the fused form's warning
            model = benchmark.compile_regions(build_model(tiny_test_config()), run)
        assert calls and all(kwargs["dynamic"] is False and kwargs["mode"] == mode for kwargs in calls)
        assert {m.cuda_depthwise_layout for m in model.modules() if isinstance(m, ConvModule)} == {layout}
    with pytest.raises(SystemExit):  # a CUDA-graph mode would give every region graphs of its own
        benchmark.main(["--quick", "--device", "cpu", "--sections", "", "--compile-mode", "reduce-overhead"])
    with pytest.raises(ValueError, match="CUDA-graph modes are refused"):
        build_model(tiny_test_config()).compile_layers(mode="reduce-overhead")


def test_compiled_profile_writes_a_table_per_batch(tmp_path):
    """--profile-compiled profiles the compile_layers() model at batch 1 and at the throughput batch (fp32 on the
    CPU); the tables list the compiled regions' work."""
    benchmark = _load_benchmark()
    out = tmp_path / "profile.txt"
    threads = torch.get_num_threads()
    try:
        benchmark.main(["--quick", "--threads", "1", "--sections", "", "--batch", "2",
                        "--profile-compiled", str(out)])
    finally:
        torch.set_num_threads(threads)
    for path, batch in ((out, 1), (tmp_path / "profile.txt.batch2", 2)):
        text = path.read_text()
        assert f"== compiled layers, fp32, batch {batch}: " in text and "failed" not in text
        assert "Self CPU" in text and "Torch-Compiled Region" in text  # the compiled regions ran in the profiled call


def _compare_versions(baseline_src):
    compare = _load_benchmark("compare_code_versions")
    return compare.main(["--baseline-src", str(baseline_src), "--threads", "1", "--seconds", "0.5", "--calls", "1"])


def test_compare_code_versions_refuses_a_baseline_src_without_the_package(tmp_path):
    """A wrong --baseline-src used to import the installed current code and compare it with itself."""
    with pytest.raises(SystemExit, match="baseline run .* mossformer2 was imported from .*, not from under"):
        _compare_versions(tmp_path / "typo" / "src")


def test_compare_code_versions_shows_the_baseline_error(tmp_path, capsys):
    package = tmp_path / "src" / "mossformer2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('this checkout is broken')\n")
    with pytest.raises(SystemExit, match="exit status 1: RuntimeError: this checkout is broken"):
        _compare_versions(tmp_path / "src")
    assert "Traceback" in capsys.readouterr().err  # the child's whole stderr is shown


def test_separate_long_file_reports_rss_after_loading(tmp_path):
    script = _load_benchmark("separate_long_file")
    out = tmp_path / "long.json"
    threads = torch.get_num_threads()
    try:
        assert script.main(["--minutes", "0.05", "--threads", "1", "--default-allocator", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert 0 < result["rss_after_model_load_mib"] <= result["peak_rss_mib"] and result["rtf"] > 0


@pytest.mark.parametrize("failing", ["", "benchmarks/gpu_checks.py"])
def test_device_session_runs_every_step_and_exits_1_if_one_failed(tmp_path, failing):
    """benchmarks/device_session.sh with a fake nvidia-smi and a fake Python that fails the named script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho fake GPU\n")
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$*" >> "$OUT/calls.txt"\n[ "$1" != "{failing}" ] || exit 3\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), "PYTHON": str(bin_dir / "python"),
           "WHEELS": str(tmp_path / "no_wheels"), "PROFILE_LIMIT": "10", "BENCH_FLAGS": "--compile-layout shifted_sum",
           "LONG_COMPILE": "1"}
    proc = subprocess.run(["bash", "benchmarks/device_session.sh"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    calls = (out / "calls.txt").read_text().splitlines()
    assert len(calls) == 6  # device name, CUDA tests, gpu_checks, two benchmarks, compiled profile: every step ran
    assert calls[1].startswith("-m pytest")
    assert calls[1].endswith("-k cuda tests/models/test_model.py tests/training/test_trainer.py")
    assert [call.endswith("--compile-layout shifted_sum") for call in calls] == [False] * 4 + [True] * 2
    assert [" --long-compile " in call for call in calls] == [False, False, True, False, False, False]
    if failing:
        assert proc.returncode == 1 and "failed steps: gpu_checks (exit 3)" in proc.stderr
    else:
        assert proc.returncode == 0 and "all steps passed" in proc.stdout

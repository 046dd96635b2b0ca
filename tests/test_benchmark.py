"""The benchmark script runs end to end in its CI-size mode and reports consistent numbers (no timing asserts)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from .conftest import load_script


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
    training = [r for r in result["rows"] if r["section"] == "training"]
    assert [r["variant"] for r in training] == ["train fp32", "train fp32 + act. ckpt"]
    assert all(r["audio_s_per_s"] > 0 for r in training)

    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == len(result["rows"]) and saved["config"]["encoder_embedding_dim"] == 16
    printed = capsys.readouterr().out
    assert "eager fp32 (baseline)" in printed and "SI-SDR vs fp32" in printed


def test_device_checks_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_checks.py (padded batch == alone, bf16 vs fp32, compiled layers == eager, long file) passes
    with the tiny model on CPU."""
    checks = _load_benchmark("gpu_checks")
    out = tmp_path / "checks.json"
    assert checks.main(["--device", "cpu", "--tiny", "--minutes", "0.1", "--checks", "padded_batch,dtypes,compiled",
                        "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["compiled"]["float32_compiled_vs_eager_float32_db"] > 60
    assert report["padded_batch"]["padded_batch_max_relative_error"] < 1e-4
    assert report["dtypes"]["bfloat16_min_si_sdr_vs_float32_db"] > 20
    assert report["long_file"]["ok"] and report["long_file"]["minutes"] == 0.1


def test_compile_diagnosis_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_compile_diagnosis.py probes the compiled rotary tables, then scores its first row (compiled
    layers, fp32) against eager on the CPU."""
    diagnosis = _load_benchmark("gpu_compile_diagnosis")
    out = tmp_path / "diagnosis.json"
    rows = diagnosis.main(["--device", "cpu", "--tiny", "--rows", "1", "--json", str(out)])
    assert rows[0]["variant"].startswith("probe: rotary cos/sin tables, 20000 frames")
    assert rows[0]["max_abs_diff"] < 1e-3  # the CPU's compiled cos / sin are accurate
    assert [row["variant"] for row in rows[1:]] == [diagnosis.ROWS[0][0]]
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

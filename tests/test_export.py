"""ONNX / TorchScript export: parity with PyTorch on several lengths, ONNX Runtime wrapper, CLI end to end."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import onnx
import pytest
import torch

from mossformer2 import build_model, save_checkpoint
from mossformer2.cli import main
from mossformer2.export import (
    CONFIG_METADATA_KEY,
    OnnxRuntimeModel,
    export_onnx,
    export_torchscript,
    load_torchscript,
)
from mossformer2.separation import Separator
from tests.conftest import make_tiny_config, seeded_tiny_model, torch_blocked_env

# Tiny config: hop 8 samples, attention groups of 64 frames = 512 samples.
GROUP_SAMPLES = 64 * 8
# Not a multiple of 8; shorter than one group; longer than two groups (and not a multiple of the group).
LENGTHS = [(1, 1237), (3, 700), (2, 2 * GROUP_SAMPLES + 333)]


def _reference(model, wave):
    with torch.no_grad():
        return model(wave)


@pytest.fixture(scope="module")
def tiny_model():
    return seeded_tiny_model()


@pytest.fixture(scope="module")
def onnx_path(tiny_onnx):
    return tiny_onnx  # exported from seeded_tiny_model(): tiny_model's weights


@pytest.mark.parametrize("batch,length", LENGTHS)
def test_onnx_dynamic_length_matches_pytorch(tiny_model, onnx_path, batch, length):
    runtime = OnnxRuntimeModel(onnx_path)
    wave = 0.1 * torch.randn(batch, length)
    expected = _reference(tiny_model, wave)
    got = runtime(wave)
    assert isinstance(got, torch.Tensor) and got.shape == (batch, 2, length)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # numpy in, numpy out: a deployment can skip torch tensors entirely.
    got_np = runtime(wave.numpy())
    assert isinstance(got_np, np.ndarray)
    np.testing.assert_allclose(got_np, expected.numpy(), atol=1e-5, rtol=1e-4)


def test_onnx_metadata_holds_config(tiny_model, onnx_path):
    proto = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[CONFIG_METADATA_KEY]) == tiny_model.config.to_dict()
    runtime = OnnxRuntimeModel(onnx_path)
    assert runtime.config == tiny_model.config
    assert runtime.eval() is runtime and runtime.to("cpu") is runtime
    # Pickled (worker processes) and deep-copied as the file: a new session (InferenceSession does not pickle)
    import copy
    import pickle

    wave = 0.1 * np.random.default_rng(0).standard_normal((1, 4000)).astype(np.float32)
    for again in (pickle.loads(pickle.dumps(Separator(runtime))).model, copy.deepcopy(runtime)):
        assert again.session is not runtime.session and again.config == runtime.config
        np.testing.assert_array_equal(again(wave), runtime(wave))


def test_damaged_export_metadata_names_the_file_and_key(onnx_path, tmp_path):
    """It said only "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"."""
    proto = onnx.load(str(onnx_path))
    next(p for p in proto.metadata_props if p.key == CONFIG_METADATA_KEY).value = "{broken"
    damaged = tmp_path / "damaged.onnx"
    onnx.save(proto, str(damaged))
    with pytest.raises(ValueError, match=f"damaged.onnx: its '{CONFIG_METADATA_KEY}' metadata is not valid JSON"):
        OnnxRuntimeModel(damaged)


def test_onnx_runtime_input_errors(onnx_path, tmp_path):
    runtime = OnnxRuntimeModel(onnx_path)
    with pytest.raises(ValueError, match="batch, samples"):
        runtime(torch.zeros(100))
    with pytest.raises(ValueError, match="at least"):
        runtime(torch.zeros(1, 10))
    # As the torch model: integer PCM (cast unscaled, 32768x too loud) and non-finite samples are refused.
    with pytest.raises(ValueError, match="floating-point samples"):
        runtime(np.full((1, 4000), 1000, dtype=np.int16))
    with pytest.raises(ValueError, match="NaN"):
        runtime(np.full((1, 4000), np.nan, dtype=np.float32))
    # Providers asked for must start: ONNX Runtime would only warn and run on the CPU.
    with pytest.raises(ValueError, match="could not start CUDAExecutionProvider"):
        OnnxRuntimeModel(onnx_path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(FileNotFoundError):
        OnnxRuntimeModel(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot load"):
        OnnxRuntimeModel(garbage)
    # A valid ONNX file that was not written by export_onnx has no config.
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["wave"], ["sources"])], "identity",
        [onnx.helper.make_tensor_value_info("wave", onnx.TensorProto.FLOAT, ["B", "T"])],
        [onnx.helper.make_tensor_value_info("sources", onnx.TensorProto.FLOAT, ["B", "T"])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(foreign))
    with pytest.raises(ValueError, match="metadata"):
        OnnxRuntimeModel(foreign)


def test_separator_runs_on_onnx_model(tiny_model, onnx_path):
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(8000 * 3)).astype(np.float32)  # 3 s at 8 kHz: resampled, chunked
    kwargs = dict(chunk_seconds=1.0, overlap_seconds=0.25)
    expected = Separator(tiny_model, device="cpu", **kwargs).separate(wave, 8000)
    got = Separator(OnnxRuntimeModel(onnx_path), backend="onnxruntime", **kwargs).separate(wave, 8000)
    assert got.shape == expected.shape == (2, wave.shape[-1])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # The refinements run on the exported model too (the ensemble doubles the batch: a dynamic axis).
    refined = dict(kwargs, polarity_ensemble=True, mixture_consistency=True)
    expected = Separator(tiny_model, device="cpu", **refined).separate(wave, 8000)
    got = Separator(OnnxRuntimeModel(onnx_path), backend="onnxruntime", **refined).separate(wave, 8000)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_an_onnx_separator_says_where_it_runs_and_takes_the_thread_setting(onnx_path, monkeypatch):
    """repr said device=cpu whatever the providers, device= was ignored without a word, and OMP_NUM_THREADS (which
    torch follows) left ONNX Runtime on every core."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model = OnnxRuntimeModel(onnx_path)
    assert model.session.get_session_options().intra_op_num_threads == 1
    assert OnnxRuntimeModel(onnx_path, num_threads=2).session.get_session_options().intra_op_num_threads == 2
    assert "device=cpu" in repr(Separator(model))  # this onnxruntime build runs on the CPU
    with pytest.warns(UserWarning, match=r"device='cuda' is not where this OnnxRuntimeModel runs \(cpu\)"):
        Separator(model, device="cuda")


def test_an_onnx_export_picked_by_filename_in_a_folder_runs_on_onnx_runtime(onnx_path, tmp_path):
    """from_pretrained(folder, filename="x.onnx") went to the checkpoint reader, which refused the file."""
    import shutil

    folder = tmp_path / "exports"
    folder.mkdir()
    shutil.copy(onnx_path, folder / "model.onnx")
    sep = Separator.from_pretrained(folder, filename="model.onnx")
    assert isinstance(sep.model, OnnxRuntimeModel) and sep.model.path == folder / "model.onnx"


def test_exports_carry_the_recommended_refinements(tiny_model, tmp_path):
    from mossformer2.export import TorchScriptModel

    recommending = tmp_path / "recommending.pt"
    save_checkpoint(recommending, tiny_model, extra={"separation": {"polarity_ensemble": True}})
    plain = tmp_path / "plain.pt"
    save_checkpoint(plain, tiny_model)
    for fmt, suffix, wrapper in (("onnx", ".onnx", OnnxRuntimeModel), ("torchscript", ".ts.pt", TorchScriptModel)):
        for source, expected in ((recommending, {"polarity_ensemble": True}), (plain, {})):
            out = tmp_path / f"{source.stem}{suffix}"
            # Metadata only: a fixed-length ONNX graph exports in a third of the dynamic one's time.
            shape = ["--no-dynamic-length", "--length-seconds", "0.1"] if fmt == "onnx" else []
            assert main(["export", "--checkpoint", str(source), "--format", fmt, "-o", str(out), *shape]) == 0
            assert wrapper(out).separation_settings == expected
        separator = Separator.from_pretrained(tmp_path / f"recommending{suffix}", device="cpu")
        assert separator.polarity_ensemble and not separator.mixture_consistency


# Run with torch_blocked_env: any `import torch` fails, as where torch is not installed.
TORCH_FREE_SCRIPT = """
import sys

import numpy as np
import soundfile as sf
from mossformer2.cli import main
from mossformer2.runtime import OnnxRuntimeModel
from mossformer2.separation import Separator

onnx_path, wav_path, out_dir, npy_path = sys.argv[1:]
wave, rate = sf.read(wav_path, dtype="float32")
separator = Separator(OnnxRuntimeModel(onnx_path), chunk_seconds=1.0, overlap_seconds=0.25,
                      polarity_ensemble=True, wiener_filter=True, mixture_consistency=True)
np.save(npy_path, separator.separate(wave, rate))
code = main(["separate", wav_path, "-o", out_dir, "--checkpoint", onnx_path, "--backend", "onnxruntime",
             "--chunk-seconds", "1.0", "--overlap-seconds", "0.25", "--subtype", "FLOAT"])
assert code == 0, code
assert main(["info", "--checkpoint", onnx_path]) == 0  # info on an export needs no torch either
assert [name for name, module in sys.modules.items() if name.split(".")[0] == "torch" and module] == []
"""


def test_onnx_deployment_needs_no_torch(tiny_model, onnx_path, tmp_path):
    """With torch unimportable, an ONNX export separates through the API (refinements included) and the
    command, and gives the torch Separator's output: a deployment needs no torch."""
    import subprocess
    import sys

    import soundfile as sf

    wave = (0.1 * np.random.default_rng(3).standard_normal(8000 * 3)).astype(np.float32)
    sf.write(tmp_path / "in.wav", wave, 8000, subtype="FLOAT")
    run = subprocess.run([sys.executable, "-c", TORCH_FREE_SCRIPT, str(onnx_path), str(tmp_path / "in.wav"),
                          str(tmp_path / "out"), str(tmp_path / "api.npy")], capture_output=True, text=True,
                         env=torch_blocked_env(tmp_path))
    assert run.returncode == 0, run.stderr
    kwargs = dict(device="cpu", chunk_seconds=1.0, overlap_seconds=0.25)
    refined = Separator(tiny_model, polarity_ensemble=True, wiener_filter=True, mixture_consistency=True,
                        **kwargs).separate(wave, 8000)
    np.testing.assert_allclose(np.load(tmp_path / "api.npy"), refined, atol=1e-4)
    plain = Separator(tiny_model, **kwargs).separate(wave, 8000)
    for k in range(2):
        written, rate = sf.read(tmp_path / "out" / f"in_s{k + 1}.wav", dtype="float32")
        assert rate == 8000
        np.testing.assert_allclose(written, plain[k], atol=1e-4)


def test_evaluate_scores_an_onnx_export_without_torch(onnx_path, tmp_path):
    """`evaluate --checkpoint X.onnx` is offered without torch: SI-SDR, PESQ and STOI score in NumPy (every
    mixture was recorded as failed with "No module named 'torch'"); SDR, which needs torch, is refused up front."""
    import json
    import subprocess
    import sys

    import soundfile as sf

    rng = np.random.default_rng(5)
    sources = (0.1 * rng.standard_normal((2, 8000 * 2))).astype(np.float32)
    for folder, wave in (("s1", sources[0]), ("s2", sources[1]), ("mix", sources.sum(0))):
        (tmp_path / "set" / folder).mkdir(parents=True)
        sf.write(tmp_path / "set" / folder / "a.wav", wave, 8000, subtype="FLOAT")
    command = [sys.executable, "-m", "mossformer2", "evaluate", "--data", str(tmp_path / "set"), "--checkpoint",
               str(onnx_path), "-o", str(tmp_path / "out")]
    env = torch_blocked_env(tmp_path)
    run = subprocess.run([*command, "--metrics", "si_sdr,stoi"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["num_scored"] == 1 and summary["num_failed"] == 0, summary
    assert math.isfinite(summary["scores"]["si_sdri"]["mean"]) and "stoi" in summary["scores"], summary
    refused = subprocess.run([*command[:-1], str(tmp_path / "out2"), "--metrics", "si_sdr,sdr"],
                             capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "metric 'sdr' needs PyTorch" in refused.stderr, refused.stderr
    assert not (tmp_path / "out2" / "scores.csv").exists()


def test_separator_and_separate_run_on_a_torchscript_export(tiny_model, checkpoint_path, tmp_path, capsys):
    """An exported TorchScript file separates like the checkpoint it came from (API and command); reading it
    as a checkpoint says what it is."""
    import soundfile as sf

    from mossformer2.checkpoint import read_checkpoint
    from mossformer2.export import TorchScriptModel

    path = export_torchscript(tiny_model, tmp_path / "tiny.ts.pt", example=0.1 * torch.randn(1, 900))
    rng = np.random.default_rng(1)
    wave = (0.1 * rng.standard_normal(8000 * 3)).astype(np.float32)
    kwargs = dict(chunk_seconds=1.0, overlap_seconds=0.25)
    expected = Separator(tiny_model, device="cpu", **kwargs).separate(wave, 8000)
    separator = Separator.from_pretrained(path, device="cpu", **kwargs)
    assert isinstance(separator.model, TorchScriptModel) and not separator.pads_batches
    np.testing.assert_allclose(separator.separate(wave, 8000), expected, atol=1e-5)
    sf.write(tmp_path / "in.wav", wave, 8000)
    assert main(["separate", str(tmp_path / "in.wav"), "-o", str(tmp_path / "out"), "--checkpoint", str(path)]) == 0
    got, _ = sf.read(tmp_path / "out" / "in_s1.wav", dtype="float32")
    reference = tmp_path / "ref"
    assert main(["separate", str(tmp_path / "in.wav"), "-o", str(reference), "--checkpoint",
                 str(checkpoint_path)]) == 0
    np.testing.assert_allclose(got, sf.read(reference / "in_s1.wav", dtype="float32")[0], atol=2e-4)
    with pytest.raises(ValueError, match="TorchScript export, not a checkpoint"):
        read_checkpoint(path)
    capsys.readouterr()
    assert main(["info", "--checkpoint", str(path)]) == 0  # info describes the export
    assert capsys.readouterr().out.startswith(f"TorchScript export: {path}")


@pytest.mark.parametrize("method", ["trace", "script"])
def test_torchscript_matches_pytorch(tiny_model, tmp_path, method):
    path = export_torchscript(tiny_model, tmp_path / f"tiny_{method}.ts.pt", method=method,
                              example=0.1 * torch.randn(1, 900))
    module, config = load_torchscript(path)
    assert config == tiny_model.config
    for batch, length in LENGTHS:
        wave = 0.1 * torch.randn(batch, length)
        with torch.no_grad():
            got = module(wave)
        torch.testing.assert_close(got, _reference(tiny_model, wave), atol=1e-5, rtol=1e-4)


def test_scripted_model_takes_lengths_for_padded_batches(tiny_model, tmp_path):
    import warnings

    assert tiny_model.separation_settings == {}  # declared by the model (the loaders fill it)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. TorchScript's "instance-level annotations on empty non-base types"
        module, _ = load_torchscript(export_torchscript(tiny_model, tmp_path / "s.ts.pt", method="script"))
    wave = 0.1 * torch.randn(2, 1300)
    wave[1, 900:] = 0.0
    lengths = torch.tensor([1300, 900])
    with torch.no_grad():
        got = module(wave, lengths)
        alone = tiny_model(wave[1:, :900])
    torch.testing.assert_close(got, _reference_with_lengths(tiny_model, wave, lengths), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1:, :, :900], alone, atol=1e-5, rtol=1e-4)


def _reference_with_lengths(model, wave, lengths):
    with torch.no_grad():
        return model(wave, lengths)


def test_export_keeps_model_state(tiny_model, tmp_path):
    model = build_model(make_tiny_config()).double().train()
    export_torchscript(model, tmp_path / "m.ts.pt")
    assert model.training and next(model.parameters()).dtype == torch.float64


def test_export_rejects_non_mossformer(tmp_path):
    with pytest.raises(ValueError, match="MossFormer2"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="method"):
        export_torchscript(build_model(make_tiny_config()), tmp_path / "x.ts.pt", method="compile")


@pytest.fixture(scope="module")
def checkpoint_path(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, tiny_model)
    return path


def test_cli_export_onnx_fixed_length(tiny_model, checkpoint_path, tmp_path, capsys):
    out = tmp_path / "fixed.onnx"
    code = main(["export", "--checkpoint", str(checkpoint_path), "--format", "onnx", "-o", str(out),
                 "--no-dynamic-length", "--length-seconds", "0.1"])
    assert code == 0
    printed = capsys.readouterr().out
    error = float(printed.split("max abs difference to PyTorch:")[1].split()[0])
    assert error < 1e-5
    runtime = OnnxRuntimeModel(out)
    wave = 0.1 * torch.randn(1, 1600)
    torch.testing.assert_close(runtime(wave), _reference(tiny_model, wave), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="fixed input shape"):
        runtime(torch.randn(1, 1700))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx"]  # no temp files left


def test_cli_export_torchscript(tiny_model, checkpoint_path, tmp_path, capsys):
    out = tmp_path / "sub" / "model.ts.pt"
    code = main(["export", "--checkpoint", str(checkpoint_path), "--format", "torchscript", "-o", str(out),
                 "--method", "script", "--length-seconds", "0.1"])
    assert code == 0
    assert "max abs difference to PyTorch" in capsys.readouterr().out
    module, _ = load_torchscript(out)
    wave = 0.1 * torch.randn(2, 3000)
    with torch.no_grad():
        torch.testing.assert_close(module(wave), _reference(tiny_model, wave), atol=1e-5, rtol=1e-4)
    # --model names a model as separate, evaluate and info take it (export had --checkpoint only).
    named = tmp_path / "named.ts.pt"
    assert main(["export", "--model", "default", "--format", "torchscript", "-o", str(named),
                 "--length-seconds", "0.1"]) == 0
    from mossformer2.pretrained import load_default_model

    builtin = load_default_model()
    with torch.no_grad():
        torch.testing.assert_close(load_torchscript(named)[0](wave), _reference(builtin, wave), atol=1e-5, rtol=1e-4)
    with pytest.raises(SystemExit):
        main(["export", "--model", "default", "--checkpoint", str(checkpoint_path), "--format", "torchscript",
              "-o", str(named)])


def test_cli_export_prints_only_its_own_lines_and_info_describes_exports(checkpoint_path, tmp_path):
    """The exporter's libraries log hundreds of INFO lines and warn about missing torchvision: a user sees
    neither. ``info`` describes an exported file instead of failing to unpickle it."""
    import subprocess
    import sys

    out = tmp_path / "tiny.onnx"  # fixed-length: the same exporter and its logging, a third of the time
    run = subprocess.run([sys.executable, "-m", "mossformer2", "export", "--checkpoint", str(checkpoint_path),
                          "--format", "onnx", "-o", str(out), "--no-dynamic-length", "--length-seconds", "0.2"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("max abs difference") and lines[1].startswith("wrote"), lines
    script = tmp_path / "tiny.ts.pt"
    assert main(["export", "--checkpoint", str(checkpoint_path), "--format", "torchscript", "-o", str(script)]) == 0
    for path, kind in ((out, "ONNX export"), (script, "TorchScript export")):
        run = subprocess.run([sys.executable, "-m", "mossformer2", "info", "--checkpoint", str(path)],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(f"{kind}: {path}") and "encoder_embedding_dim" in run.stdout


def test_cli_export_errors(checkpoint_path, tmp_path, capsys, monkeypatch):
    out = tmp_path / "x.ts.pt"
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--format", "torchscript",
                 "-o", str(out)]) == 1
    assert main(["export", "--checkpoint", str(checkpoint_path), "--format", "torchscript", "-o", str(out),
                 "--opset", "17"]) == 1
    assert "--opset only applies" in capsys.readouterr().err
    # An export that differs by more than the tolerance: the check fails and no output file is left behind.
    import mossformer2.export

    monkeypatch.setattr(mossformer2.export, "verify_export", lambda *_args, **_kwargs: 0.5)
    assert main(["export", "--checkpoint", str(checkpoint_path), "--format", "torchscript", "-o", str(out),
                 "--tolerance", "0.1", "--length-seconds", "0.1"]) == 1
    err = capsys.readouterr().err
    assert "differs from PyTorch by 0.5 > --tolerance 0.1" in err and f"{out} was not written" in err
    assert list(tmp_path.iterdir()) == []


def test_torchscript_runs_only_from_a_named_local_ts_pt_file_and_info_runs_none(tiny_model, tmp_path, monkeypatch,
                                                                                 capsys):
    """TorchScript is a program: a .pt found by its contents ran through torch.jit.load from any reference (a hub
    repository's last_best_checkpoint.pt, a folder, a file handed over as weights), past weights_only."""
    from mossformer2.separation import load_separation_model

    export = export_torchscript(tiny_model, tmp_path / "model.ts.pt", example=0.1 * torch.randn(1, 900))
    assert load_separation_model(export, device="cpu").config.to_dict() == tiny_model.config.to_dict()
    disguised = tmp_path / "weights" / "last_best_checkpoint.pt"
    disguised.parent.mkdir()
    disguised.write_bytes(export.read_bytes())
    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *args, **kwargs: calls.append(args))
    with pytest.raises(ValueError, match=r"last_best_checkpoint.pt is a TorchScript program, not a checkpoint of "
                                         r"weights: a program runs only from a file named \*\.ts\.pt"):
        Separator.from_pretrained(disguised, device="cpu")
    with pytest.raises(ValueError, match="is a TorchScript program, not a checkpoint of weights"):
        load_separation_model(disguised.parent, device="cpu")  # a folder finds it as the official file name
    pointing = tmp_path / "repo"  # the official layout's pointer file, naming an export
    pointing.mkdir()
    (pointing / "model.ts.pt").write_bytes(export.read_bytes())
    (pointing / "last_best_checkpoint").write_text("model.ts.pt\n")
    from mossformer2.hub import checkpoint_path

    for ref, filename in ((pointing, None), (tmp_path, "model.ts.pt")):
        message = r"model.ts.pt, found through .*, is a TorchScript export: a program from a hub repository or a folder"
        with pytest.raises(ValueError, match=message):
            load_separation_model(ref, device="cpu", filename=filename)
        with pytest.raises(ValueError, match=message):  # what evaluate resolves (to hash the weights) first
            checkpoint_path(ref, filename)
    import soundfile as sf

    for folder in ("mix", "s1", "s2"):
        (tmp_path / "data" / folder).mkdir(parents=True)
        sf.write(tmp_path / "data" / folder / "a.wav", np.random.default_rng(len(folder)).uniform(-.1, .1, 4000),
                 16000)
    assert main(["evaluate", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "ev"), "--checkpoint",
                 str(pointing)]) == 1
    assert "is a TorchScript export: a program from a hub repository" in capsys.readouterr().err
    # info shows what the file says without loading its code
    assert main(["info", "--checkpoint", str(disguised)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"TorchScript export: {disguised}") and "encoder_embedding_dim" in out
    assert f"parameters: {sum(p.numel() for p in tiny_model.parameters()):,}" in out
    assert calls == []


def test_onnx_exports_keep_a_batch_axis_check_their_settings_and_open_from_home(tiny_model, tiny_onnx, tmp_path,
                                                                                  monkeypatch):
    """A dynamic export traced with a batch-1 example fixed its batch axis to 1 (the exporter fixes an axis of
    size 1); an export wrote separation settings its loaders then refused; `~/m.onnx` was "ONNX model not found"
    (.pt paths expanded ~)."""
    import copy
    import shutil

    odd = copy.deepcopy(tiny_model)
    odd.separation_settings = {"wiener_filter": "yes"}
    with pytest.raises(ValueError, match=r"separation settings \['wiener_filter'\] must be true or false"):
        export_onnx(odd, tmp_path / "odd.onnx")
    with pytest.raises(ValueError, match="must be true or false"):
        export_torchscript(odd, tmp_path / "odd.ts.pt")
    assert list(tmp_path.iterdir()) == []
    traced = []

    def record(model, args, *rest, **kwargs):
        traced.append((tuple(args[0].shape), kwargs["dynamic_shapes"]))
        raise RuntimeError("recorded")  # (the export itself is tested elsewhere: ~12 s)

    monkeypatch.setattr(torch.onnx, "export", record)
    for dynamic, batch in ((True, 2), (False, 1)):
        with pytest.raises(RuntimeError, match="recorded"):
            export_onnx(tiny_model, tmp_path / "m.onnx", dynamic_length=dynamic, example=torch.randn(1, 1000))
        assert traced.pop()[0] == (batch, 1000)
    monkeypatch.undo()
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(tiny_onnx, tmp_path / "m.onnx")
    model = OnnxRuntimeModel("~/m.onnx")
    assert model.path == tmp_path / "m.onnx" and isinstance(model.input_shape[0], str)  # a symbolic batch


def test_the_python_exports_refuse_names_the_loaders_would_misread(tiny_model, tmp_path):
    """export_onnx wrote any name (a .bin file that from_pretrained then called "an ONNX export, not a
    checkpoint"); the command line already refused such names."""
    with pytest.raises(ValueError, match=r"model\.bin: an ONNX export's name must end in \.onnx"):
        export_onnx(tiny_model, tmp_path / "model.bin")
    for name in ("model.onnx", "model.pt"):
        with pytest.raises(ValueError, match=rf"{name}: a TorchScript export's name must end in \.ts\.pt"):
            export_torchscript(tiny_model, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_a_chosen_opset_is_the_files_opset(tiny_model, tmp_path):
    """--opset N writes opset N (the refusals below once guarded an opset silently replaced by 18)."""
    import onnxruntime as ort

    opset = 20
    if onnx.defs.onnx_opset_version() < opset:
        pytest.skip(f"onnx {onnx.__version__} writes opsets up to {onnx.defs.onnx_opset_version()}")
    path = export_onnx(tiny_model, tmp_path / "m.onnx", dynamic_length=False, example=0.1 * torch.randn(1, 900),
                       opset=opset)
    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == opset
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # and ONNX Runtime takes it


def test_cli_export_refuses_bad_requests_before_exporting(tiny_model, checkpoint_path, tmp_path, capsys):
    """Each was a traceback, an export into a folder that failed only after the export, a file the other commands
    could not recognise, or an opset silently replaced by 18."""
    ckpt = str(checkpoint_path)
    script = export_torchscript(tiny_model, tmp_path / "tiny.ts.pt", example=0.1 * torch.randn(1, 900))
    (tmp_path / "folder").mkdir()
    for args, reason in [
        (["--format", "onnx", "-o", str(tmp_path / "folder")], "is a folder"),
        (["--format", "onnx", "-o", str(tmp_path / "model.pt")], "must end in .onnx"),
        (["--format", "torchscript", "-o", str(tmp_path / "model.onnx")], "must end in .ts.pt"),
        (["--format", "onnx", "-o", str(tmp_path / "m.onnx"), "--opset", "17"], "opset 17"),
        (["--format", "torchscript", "-o", str(tmp_path / "m.ts.pt"), "--length-seconds", "inf"], "positive number"),
        # an example of 10^6 s: an out-of-memory traceback
        (["--format", "torchscript", "-o", str(tmp_path / "m.ts.pt"), "--length-seconds", "1e6"], "up to 600"),
        # above what the installed onnx knows: it was a traceback from deep inside the exporter
        (["--format", "onnx", "-o", str(tmp_path / "m.onnx"), "--opset", "99"],
         f"ONNX opset 99 is not available: the exporter with this onnx ({onnx.__version__}) writes 18 to "
         f"{onnx.defs.onnx_opset_version()}"),
        # options of the other format, which were ignored without a word
        (["--format", "torchscript", "-o", str(tmp_path / "m.ts.pt"), "--no-dynamic-length"],
         "--[no-]dynamic-length only applies to --format onnx, not --format torchscript"),
        (["--format", "onnx", "-o", str(tmp_path / "m.onnx"), "--method", "script"],
         "--method only applies to --format torchscript, not --format onnx"),
        # no export passes it (it failed after the export); a fixed length under the model's shortest input was
        # raised to it without a word
        (["--format", "torchscript", "-o", str(tmp_path / "m.ts.pt"), "--tolerance", "-1"], "--tolerance must be >= 0"),
        (["--format", "onnx", "-o", str(tmp_path / "m.onnx"), "--no-dynamic-length", "--length-seconds", "1e-4"],
         "under the model's shortest input"),
    ]:
        assert main(["export", "--checkpoint", ckpt, *args]) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("mossformer2 export: error:") and reason in err, err
    assert main(["export", "--checkpoint", str(script), "--format", "onnx", "-o", str(tmp_path / "again.onnx")]) == 1
    assert "already a TorchScript export" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "tiny.ts.pt"]
    for opset in (17, onnx.defs.onnx_opset_version() + 1):
        with pytest.raises(ValueError, match=f"opset {opset} is not available"):
            export_onnx(tiny_model, tmp_path / "x.onnx", opset=opset)


def test_missing_onnx_packages_are_a_one_line_error(tmp_path, monkeypatch, capsys):
    """Without the optional onnx / onnxruntime packages: an ImportError that is also a ValueError, so the command
    prints one line saying what to install (it printed a ModuleNotFoundError traceback)."""
    import soundfile as sf

    from mossformer2.runtime import MissingDependencyError

    fake = tmp_path / "m.onnx"
    fake.write_bytes(b"not read: the import fails first")
    sf.write(tmp_path / "a.wav", np.full(800, 0.1, np.float32), 16000)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="pip install onnxruntime") as info:
        OnnxRuntimeModel(fake)
    assert isinstance(info.value, MissingDependencyError) and isinstance(info.value, ValueError)
    for command in (["separate", str(tmp_path / "a.wav"), "-o", str(tmp_path / "out"), "--checkpoint", str(fake)],
                    ["info", "--checkpoint", str(fake)]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert "needs the Python package 'onnxruntime'" in err and "Traceback" not in err, err
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(MissingDependencyError, match="pip install onnx"):
        export_onnx(build_model(make_tiny_config()), tmp_path / "x.onnx")


def test_torchscript_exports_run_in_float32(tiny_model, tmp_path):
    """Under bfloat16 autocast a traced graph failed on a dtype mismatch (the built-in model) or never finished
    (this tiny one): TorchScript exports run in float32, and the Separator says that it ignores a reduced dtype."""
    from mossformer2.export import TorchScriptModel

    traced = export_torchscript(tiny_model, tmp_path / "traced.ts.pt", example=0.1 * torch.randn(1, 900))
    scripted = export_torchscript(tiny_model, tmp_path / "scripted.ts.pt", method="script")
    wave = 0.1 * torch.randn(1, 1200)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert TorchScriptModel(scripted)(wave).dtype == torch.float32
    with pytest.warns(UserWarning, match="float32 only"):
        separator = Separator(TorchScriptModel(traced), device="cpu", dtype="bfloat16")
    expected = Separator(tiny_model, device="cpu").separate(wave[0].numpy(), 16000)
    np.testing.assert_allclose(separator.separate(wave[0].numpy(), 16000), expected, atol=1e-5)


def test_onnx_providers_follow_the_device(onnx_path, tmp_path, monkeypatch, capsys):
    """``--device cpu`` kept ONNX Runtime on CUDA whenever its build had CUDA: the providers follow the device."""
    import onnxruntime
    import soundfile as sf

    from mossformer2.runtime import providers_for_device

    real_session = onnxruntime.InferenceSession
    requested = []

    def session(path, options=None, providers=None):
        requested.append(list(providers))
        return real_session(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider",
                                                                          "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    wav = tmp_path / "mix.wav"
    sf.write(str(wav), (0.1 * np.random.default_rng(0).standard_normal(1600)).astype(np.float32), 16000)
    assert main(["separate", str(wav), "-o", str(tmp_path / "out"), "--checkpoint", str(onnx_path),
                 "--device", "cpu"]) == 0
    assert requested == [["CPUExecutionProvider"]]
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers_for_device("auto", cuda) == cuda and providers_for_device("auto", cuda[1:]) == cuda[1:]
    assert providers_for_device("cuda:1", cuda)[0] == ("CUDAExecutionProvider", {"device_id": 1})
    with pytest.raises(ValueError, match="no CUDA provider"):
        providers_for_device("cuda", cuda[1:])
    for bad in ("gpu", "cuda:", "cuda:x"):
        with pytest.raises(ValueError, match="unknown device"):
            providers_for_device(bad, cuda)


def test_a_fixed_length_onnx_export_chunks_by_its_length_and_fails_shorter_files_alone(tiny_model, tmp_path,
                                                                                       capsys):
    """A fixed-length export needed the chunk settings typed by hand (every other length failed); it now chunks by
    its own length unless told otherwise. A file shorter than it fails alone, the batch goes on; chunk options
    that do not fit it are refused once, up front (they would fail file after file). The ensemble runs too (a
    fixed batch of 1 takes larger batches item by item)."""
    import soundfile as sf

    fixed = export_onnx(tiny_model, tmp_path / "fixed.onnx", dynamic_length=False, example=0.1 * torch.randn(1, 1600))
    data = tmp_path / "in"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name, length in (("fits.wav", 1600), ("longer.wav", 2000), ("shorter.wav", 1200)):
        sf.write(str(data / name), (0.1 * rng.standard_normal(length)).astype(np.float32), 16000)
    out = tmp_path / "out"
    options = ["--checkpoint", str(fixed), "--polarity-ensemble", "--batch-size", "2"]
    assert main(["separate", str(data), "-o", str(out), *options, "--chunk-seconds", "0.2",
                 "--overlap-seconds", "0.05"]) == 1
    err = capsys.readouterr().err
    assert "error: --chunk-seconds 0.2 / --overlap-seconds 0.05 do not fit the export: 1 of 3 input(s) would run " \
        "passes of another length (e.g. longer.wav)" in err and "--dynamic-length" in err, err
    assert not out.exists()  # refused before separating anything (or creating the folder)
    assert main(["separate", str(data), "-o", str(out), *options]) == 1
    err = capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["fits_s1.wav", "fits_s2.wav", "longer_s1.wav", "longer_s2.wav"]
    failed = [line for line in err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "shorter.wav" in failed[0] and "is shorter than the fixed input length" in failed[0]
    assert "overlap by 0.05 s only" in err  # an export this short: the speakers may swap between its chunks
    with pytest.warns(UserWarning, match="overlap by 0.05 s only"):
        separator = Separator(OnnxRuntimeModel(fixed))
    assert (separator.chunk, separator.overlap) == (1600, 800)
    longer = 0.1 * rng.standard_normal(2000).astype(np.float32)
    chunked = Separator(OnnxRuntimeModel(fixed), chunk_seconds=0.1, overlap_seconds=0.05)  # as the advice says
    np.testing.assert_array_equal(separator.separate(longer, 16000), chunked.separate(longer, 16000))
    advice = "fixed input length of 1600 samples.*with an overlap of 0.05 s.*--overlap-seconds 0.05"
    with pytest.raises(ValueError, match=advice):  # settings of the user's own that do not fit the export
        Separator(OnnxRuntimeModel(fixed), chunk_seconds=0.2, overlap_seconds=0.05).separate(longer, 16000)
    # Without an example, a fixed-length export takes batch 1 (batch 2 made every other batch size fail).
    default = OnnxRuntimeModel(export_onnx(tiny_model, tmp_path / "default.onnx", dynamic_length=False))
    assert default.input_shape[0] == 1


def test_export_takes_a_bare_state_dicts_architecture_from_model_config(tmp_path, capsys):
    from mossformer2.export import torchscript_metadata

    config = make_tiny_config(sample_rate=8000)
    torch.save(build_model(config).state_dict(), tmp_path / "bare.pt")
    (tmp_path / "tiny.json").write_text(json.dumps(config.to_dict()))  # (JSON is YAML)
    assert main(["export", "--checkpoint", str(tmp_path / "bare.pt"), "--model-config", str(tmp_path / "tiny.json"),
                 "--format", "torchscript", "-o", str(tmp_path / "m.ts.pt"), "--length-seconds", "0.2"]) == 0
    assert torchscript_metadata(tmp_path / "m.ts.pt")[0] == config
    assert main(["export", "--checkpoint", str(tmp_path / "bare.pt"), "--model-config", "MossFormer2-S",
                 "--format", "torchscript", "-o", str(tmp_path / "s.ts.pt")]) == 1  # strict: not that size
    assert "mossformer2 export: error:" in capsys.readouterr().err and not (tmp_path / "s.ts.pt").exists()


def test_verify_export_reports_the_largest_difference(monkeypatch):
    """One wrong sample in an export's output is the reported difference (max abs, not a mean that hides it)."""
    import mossformer2.export as export

    model = seeded_tiny_model()

    def wrong_in_one_sample(wave):
        with torch.no_grad():
            out = model(wave).clone()
        out[0, 0, 5] += 0.5
        return out

    monkeypatch.setattr(export, "load_torchscript", lambda path: (wrong_in_one_sample, model.config))
    assert abs(export.verify_export(model, "unused.ts.pt", "torchscript") - 0.5) < 1e-4


def _identity_onnx(path, config, metadata_extra=None):
    """A hand-made ``wave -> sources`` Identity graph with a mossformer2 config in its metadata (no export needed)."""
    import json

    import pytest

    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from mossformer2.runtime import CONFIG_METADATA_KEY

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["wave"], ["sources"])], "g",
        [onnx.helper.make_tensor_value_info("wave", onnx.TensorProto.FLOAT, ["batch", "samples"])],
        [onnx.helper.make_tensor_value_info("sources", onnx.TensorProto.FLOAT, ["batch", "samples"])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in {CONFIG_METADATA_KEY: json.dumps(config.to_dict()), **(metadata_extra or {})}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def test_an_onnx_file_without_the_dynamic_length_key_is_dynamic(tmp_path):
    """Files exported before the key existed were all dynamic-length exports."""
    from mossformer2.models.config import tiny_test_config
    from mossformer2.runtime import OnnxRuntimeModel

    path = _identity_onnx(tmp_path / "old.onnx", tiny_test_config())
    assert OnnxRuntimeModel(path, providers=["CPUExecutionProvider"]).dynamic_length is True


def test_an_onnx_model_takes_an_input_of_exactly_the_minimum_length(tmp_path):
    import numpy as np

    from mossformer2.models.config import tiny_test_config
    from mossformer2.runtime import OnnxRuntimeModel

    config = tiny_test_config()
    model = OnnxRuntimeModel(_identity_onnx(tmp_path / "m.onnx", config), providers=["CPUExecutionProvider"])
    assert model(np.zeros((1, config.min_input_length), np.float32)).shape[-1] == config.min_input_length

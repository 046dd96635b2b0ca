"""Checkpoint loading/saving: official container, prefixes, aliases, strict errors, config inference."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import mossformer2
from mossformer2 import build_model, load_model, save_checkpoint
from mossformer2.checkpoint import checkpoint_summary, infer_config, read_checkpoint
from mossformer2.cli import main
from tests.conftest import make_tiny_config


@pytest.fixture
def tiny_model(tiny_config):
    return build_model(tiny_config).eval()


def _official_container(model: torch.nn.Module) -> dict:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(1, 400)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 7, "step": 1234}


def _same_output(a, b, length=900):
    x = torch.randn(1, length)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_official_container_roundtrip_infers_config(tmp_path):
    # group_size leaves no trace in the weights: official checkpoints use the default (256).
    config = make_tiny_config(num_mossformer_layer=2, num_spks=3, encoder_kernel_size=8, group_size=256)
    model = build_model(config).train()
    path = tmp_path / "last_best_checkpoint.pt"
    torch.save(_official_container(model), path)
    loaded = load_model(path)
    assert loaded.config == config
    assert not loaded.training
    _same_output(model, loaded)


def test_module_prefix_and_missing_aliases_are_accepted(tiny_model):
    state = tiny_model.state_dict()
    stripped = {f"module.{k}": v for k, v in state.items()
                if not k.endswith("pos_enc.inv_freq") and "rotary_pos_emb" not in k}
    loaded = load_model(stripped, config=tiny_model.config)
    _same_output(tiny_model, loaded)


def test_torch_compile_and_nested_wrapper_prefixes_are_peeled(tiny_model):
    """A state dict saved from torch.compile(model) (keys `_orig_mod.`), or DDP around it, or a wrapper's
    `model.` around either, was "not a MossFormer2 checkpoint: missing [...]"."""
    state = tiny_model.state_dict()
    compiled = torch.compile(tiny_model).state_dict()  # (compiling happens on the first call: none here)
    assert next(iter(compiled)).startswith("_orig_mod.")
    for prefix in ("_orig_mod.", "module._orig_mod.", "_orig_mod.module.", "model.module._orig_mod."):
        wrapped = {f"{prefix}{k}": v for k, v in state.items()}
        _same_output(tiny_model, load_model({"state_dict": wrapped}))
    _same_output(tiny_model, load_model(compiled))


def test_rotary_dim_is_read_from_any_layer_and_said_assumed_without_one():
    """rotary_dim was read from layers.0's table only; without it the guess min(32, query_key_dim) changed the
    output of a custom size silently (the warning named sample_rate, group_size and dropout only)."""
    model = build_model(make_tiny_config(num_mossformer_layer=2, rotary_dim=4, group_size=256, dropout=0.1))
    state = model.state_dict()
    without_first = {k: v for k, v in state.items() if "layers.0.rotary_pos_emb" not in k}
    with pytest.warns(UserWarning) as said:
        _same_output(model, load_model(without_first))
    assert "rotary_dim" not in str(said[0].message)
    without_any = {k: v for k, v in state.items() if "rotary_pos_emb" not in k}
    with pytest.warns(UserWarning, match=r"dropout=0.1, rotary_dim=16 \(official values\)"):
        assert load_model(without_any).config.rotary_dim == 16  # min(32, query_key_dim): a wrong guess, now said


def test_another_scripts_config_entry_does_not_make_good_weights_unloadable(tiny_model):
    """'config': vars(args) of someone's training script was parsed as a MossFormer2Config and refused."""
    state = tiny_model.state_dict()
    foreign = {"model": state, "config": {"lr": 1e-3, "batch_size": 4, "epochs": 100}}
    with pytest.warns(UserWarning, match="sizes read from its tensor shapes"):
        _same_output(tiny_model, load_model(foreign, config=None))
    ours = {"model": state, "config": {**tiny_model.config.to_dict(), "lr": 1e-3}}  # ours, with a stray key
    with pytest.raises(ValueError, match="embedded config is invalid"):
        load_model(ours)
    # A partial config of ours still counts: its other fields are the defaults (the official sizes here).
    from mossformer2.checkpoint import _config_from_checkpoint

    assert _config_from_checkpoint({"config": {"sample_rate": 8000, "num_spks": 2}}).sample_rate == 8000
    assert _config_from_checkpoint({"config": {"lr": 1e-3}}) is None


def test_numpy_scalars_in_a_checkpoint_load_and_numpy_arrays_stay_refused(tiny_model, tmp_path):
    """{'model': ..., 'best_loss': np.float64(...)} (common in training scripts) was refused as "Python objects
    that could run code"; a scalar rebuilds from bytes and a dtype. An array pickles through a reconstructor."""
    import numpy as np

    path = tmp_path / "scalars.pt"
    torch.save({"model": tiny_model.state_dict(), "best_loss": np.float64(-12.3), "epoch": np.int64(7),
                "ok": np.bool_(True)}, path)
    assert read_checkpoint(path)["best_loss"] == -12.3
    _same_output(tiny_model, load_model(path, config=tiny_model.config))
    # NumPy 1.x pickled the scalar as numpy.core.multiarray.scalar: such files are most of the older ones.
    import zipfile

    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    pickled = next(name for name in files if name.endswith("data.pkl"))
    old_name = files[pickled].replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")  # (protocol 2)
    assert old_name != files[pickled]
    with zipfile.ZipFile(tmp_path / "numpy1.pt", "w") as archive:
        for name, data in files.items():
            archive.writestr(name, old_name if name == pickled else data)
    assert read_checkpoint(tmp_path / "numpy1.pt")["best_loss"] == -12.3
    torch.save({"model": tiny_model.state_dict(), "curve": np.zeros(3)}, tmp_path / "array.pt")
    with pytest.raises(ValueError, match="could run code"):
        read_checkpoint(tmp_path / "array.pt")


def test_rotary_aliases_are_accepted():
    model = build_model(make_tiny_config(num_mossformer_layer=3))
    state = model.state_dict()
    assert sum("rotary_pos_emb.freqs" in k for k in state) == 3
    _same_output(model, load_model(state))


def test_missing_unexpected_and_mismatched_keys_are_named(tiny_model):
    state = dict(tiny_model.state_dict())
    state.pop("mask_net.prelu.weight")
    state["mask_net.extra.weight"] = torch.zeros(3)
    state["mask_net.output.0.bias"] = torch.zeros(99)
    with pytest.raises(ValueError) as info:
        load_model(state, config=tiny_model.config)
    message = str(info.value)
    assert "missing keys: mask_net.prelu.weight" in message
    assert "unexpected keys: mask_net.extra.weight" in message
    assert "mask_net.output.0.bias (checkpoint [99] vs model [16])" in message


def test_config_mismatch_is_reported(tiny_model):
    other = make_tiny_config(encoder_embedding_dim=24, mossformer_sequence_dim=24)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_model(tiny_model.state_dict(), config=other)


def test_not_a_checkpoint_file(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello, not a checkpoint")
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint: torch.save writes a zip archive"):
        load_model(text)  # was "(KeyError: 101)"
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pt is empty \(0 bytes\)"):
        load_model(empty)
    pointer = tmp_path / "lfs.pt"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 670000000\n")
    with pytest.raises(ValueError, match="is a Git LFS pointer, not the checkpoint itself"):
        load_model(pointer)
    broken = tmp_path / "broken.pt"  # a zip that is not a whole checkpoint: "(OSError: Invalid argument)" before
    whole = save_checkpoint(tmp_path / "whole.pt", build_model(make_tiny_config())).read_bytes()
    broken.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"broken.pt is truncated or damaged: its zip archive has no readable end"):
        load_model(broken)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="several checkpoints in"):  # a folder: which of its files?
        load_model(tmp_path)


def test_a_flipped_byte_in_the_weights_is_refused_by_their_checksum(tmp_path):
    """torch.load does not check the zip's CRC-32s: a checkpoint with one bit flipped in a weight loaded, with a
    wrong weight (a damaged download or disk)."""
    import struct
    import zipfile

    model = build_model(make_tiny_config())
    path = save_checkpoint(tmp_path / "whole.pt", model)
    load_model(path)  # intact: loads
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 64)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack_from("<HH", data, member.header_offset + 26)  # its local header
    start = member.header_offset + 30 + name_length + extra_length
    data[start + member.file_size // 2] ^= 0x10
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"damaged.pt is damaged: its member {member.filename} does not match"):
        load_model(damaged)


def test_a_plain_pickle_is_refused_without_running_it_or_torch_noise(tmp_path, recwarn):
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Payload()}, protocol=4))
    with pytest.raises(ValueError, match="evil.pt"):
        load_model(path)
    assert not marker.exists()
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]  # torch's "please file an issue"


def test_other_architecture_is_rejected(tmp_path):
    path = tmp_path / "linear.pt"
    torch.save({"model": torch.nn.Linear(3, 4).state_dict(), "epoch": 1}, path)
    with pytest.raises(ValueError, match="not a MossFormer2 checkpoint"):
        load_model(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="not a checkpoint dictionary"):
        load_model(path)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


class _EvilShell:
    """torch words a global of a blocked module (os, subprocess, ...) differently from other refused globals."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["print", "os.system"])
def test_untrusted_pickle_is_not_executed(tmp_path, capsys, kind):
    """Refused in our own words: PyTorch's message has ANSI bold codes and advises ``weights_only=False``."""
    path = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    torch.save({"model": _Evil() if kind == "print" else _EvilShell(marker)}, path)
    with pytest.raises(ValueError, match="not a plain tensor checkpoint") as caught:
        load_model(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "refusing to load it" in message and "\n" not in message
    assert "weights_only" not in message and "\x1b" not in message
    assert ("(print)" if kind == "print" else ".system)") in message
    assert "pwned" not in capsys.readouterr().out and not marker.exists()


def test_save_checkpoint_embeds_config_and_is_official_layout(tmp_path, tiny_model):
    optimizer = torch.optim.Adam(tiny_model.parameters())
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_model, optimizer, epoch=3, step=42, extra={"note": "x"})
    raw = torch.load(path, weights_only=True)
    assert {"model", "config", "epoch", "step", "optimizer", "note"} <= set(raw)
    assert list(raw["model"]) == list(tiny_model.state_dict())  # official loaders read raw['model']
    loaded = load_model(path)
    assert loaded.config == tiny_model.config  # group_size too: it comes from the embedded config
    _same_output(tiny_model, loaded)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp files left behind
    with pytest.raises(ValueError, match="overwrite"):
        save_checkpoint(tmp_path / "x.pt", tiny_model, extra={"model": 1})
    # Recommended settings given as extra are checked as load_model checks them (a file that did not load)
    with pytest.raises(ValueError, match=r"extra\['separation'\]: .*must be true or false"):
        save_checkpoint(tmp_path / "x.pt", tiny_model, extra={"separation": {"mixture_consistency": "yes"}})
    assert not (tmp_path / "x.pt").exists()


def test_infer_config_full_size_shapes():
    state = build_model("MossFormer2-S").state_dict()
    assert infer_config(state) == mossformer2.MossFormer2Config(
        encoder_embedding_dim=384, mossformer_sequence_dim=384, num_mossformer_layer=25)

def test_an_official_size_without_a_config_is_noted_at_info_level(caplog):
    """The released file has no config: its assumed fields are as expected, an INFO note (no warning)."""
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="mossformer2.checkpoint"):
        warnings.simplefilter("error")
        load_model({"model": build_model("MossFormer2-S").state_dict()})
    [record] = [r for r in caplog.records if "assumed" in r.getMessage()]
    assert record.levelno == logging.INFO and "group_size=256" in record.getMessage()


def test_info_cli_named_model(capsys):
    assert main(["info", "--model", "MossFormer2"]) == 0
    assert "parameters: 55,735,410" in capsys.readouterr().out


def test_info_cli_checkpoint(tmp_path, tiny_model, capsys):
    path = tmp_path / "official.pt"
    torch.save(_official_container(tiny_model), path)
    assert main(["info", "--checkpoint", str(path)]) == 0
    out = capsys.readouterr().out
    assert "epoch: 7  step: 1234" in out and "optimizer state: yes" in out
    summary = checkpoint_summary(path)
    assert summary["num_rotary_aliases"] == 0  # one layer: its own table, no alias (the official file: 23)
    deeper = build_model(make_tiny_config(num_mossformer_layer=3))
    torch.save(_official_container(deeper), tmp_path / "deeper.pt")
    assert checkpoint_summary(tmp_path / "deeper.pt")["num_rotary_aliases"] == 2
    assert main(["info", "--checkpoint", str(tmp_path / "nope.pt")]) == 1


def test_info_cli_reads_folders_and_bare_state_dicts(tmp_path, tiny_model, capsys):
    """``info --checkpoint`` takes what ``separate`` and ``export`` take (a folder was "not a checkpoint file");
    a bare state dict is named as such instead of listing its every tensor as "container keys"."""
    folder = tmp_path / "exp"
    folder.mkdir()
    torch.save(tiny_model.state_dict(), folder / "weights.pt")
    assert main(["info", "--checkpoint", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"checkpoint: {folder / 'weights.pt'}") and "bare state dict" in out
    assert "container keys" not in out and "enc.conv1d.weight" not in out
    assert checkpoint_summary(folder / "weights.pt")["container_keys"] == []


def test_info_reads_a_checkpoint_once(tmp_path, tiny_model, monkeypatch, capsys):
    """``info`` read the file twice (summary, then model): twice the time on the official 670 MB file."""
    path = tmp_path / "official.pt"
    torch.save(_official_container(tiny_model), path)
    real_load, loads = torch.load, []

    def counting_load(*args, **kwargs):
        loads.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    assert main(["info", "--checkpoint", str(path)]) == 0
    assert len(loads) == 1 and "epoch: 7" in capsys.readouterr().out


def test_info_reads_model_names_as_separate_does(capsys):
    """``separate --model default`` is the built-in model; ``info --model default`` was an unknown name."""
    from mossformer2.pretrained import default_model_path

    assert main(["info", "--model", "default"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"checkpoint: {default_model_path()}") and "recommended separation settings" in out
    assert main(["info"]) == 0  # without options: the model `separate` uses without options, and it says so
    plain = capsys.readouterr().out
    assert plain.startswith("the built-in model, which `separate` uses") and plain.endswith(out)
    assert main(["info", "--model", "MossFormer2-S"]) == 0  # configuration names still work
    assert "model: MossFormer2-S" in capsys.readouterr().out
    assert main(["info", "--model", "nonsense"]) == 1
    err = capsys.readouterr().err
    assert "'default'" in err and "MossFormer2-S" in err, err


def _ema_training_state(tmp_path: Path, tiny_config) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    """A trainer ``last.pt`` that kept a moving average: raw weights in 'model', the average in 'ema'."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(1)
    average, raw = build_model(tiny_config), build_model(tiny_config)
    ema = AveragedModel(average, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    ema.n_averaged += 12
    path = tmp_path / "last.pt"
    save_checkpoint(path, raw, torch.optim.SGD(raw.parameters(), lr=0.1), epoch=3, step=12,
                    extra={"ema": ema.state_dict(),
                           "trainer_state": {"epoch": 3, "step": 12, "best_metric": 4.5, "best_epoch": 1}})
    return path, average, raw


def test_load_model_takes_the_moving_average_of_a_training_state(tmp_path, tiny_config, caplog):
    """An EMA run's last.pt: validation scored the average (best.pt holds it), so separating with last.pt used
    the raw weights without a word. The average is now the default, said in the log; the raw ones on request."""
    path, average, raw = _ema_training_state(tmp_path, tiny_config)
    with caplog.at_level("INFO", logger="mossformer2"):
        model = load_model(path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in average.state_dict().items())
    assert "moving average ('ema', 12 updates)" in caplog.text
    model = load_model(path, weights="model")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in raw.state_dict().items())
    with pytest.raises(ValueError, match="no moving average"):
        load_model(raw.state_dict(), weights="average")


def test_info_says_which_weights_separate_uses_and_the_validation_scores(tmp_path, tiny_config, capsys):
    path, _, _ = _ema_training_state(tmp_path, tiny_config)
    assert main(["info", "--checkpoint", str(path)]) == 0
    out = capsys.readouterr().out
    assert "weights used to separate: the moving average ('ema', 12 updates)" in out
    assert "validation: 3 epochs completed; best SI-SDRi 4.50 dB at epoch 1" in out
    best = tmp_path / "best.pt"
    save_checkpoint(best, build_model(tiny_config), epoch=1, step=8,
                    extra={"valid": {"epoch": 1.0, "step": 8.0, "valid_si_sdri": 4.5, "valid_si_sdr": 3.25}})
    assert main(["info", "--checkpoint", str(best)]) == 0
    out = capsys.readouterr().out
    assert "validation: SI-SDRi 4.50 dB, SI-SDR 3.25 dB (epoch 1, counting from 0; step 8)" in out
    assert "weights used to separate" not in out


def test_info_says_when_group_size_was_assumed(tmp_path, tiny_model, capsys):
    """A bare state dict stores no config: its sizes come from the tensor shapes, but group_size (and dropout)
    cannot, so the printed group_size is the official default, which info now says instead of passing it off as
    the model's."""
    torch.save(tiny_model.state_dict(), tmp_path / "bare.pt")
    assert main(["info", "--checkpoint", str(tmp_path / "bare.pt")]) == 0
    out = capsys.readouterr().out
    assert "group_size and dropout (and rotary_dim, where the file has no rotary table) leave no trace" in out
    assert "group_size: 256" in out
    save_checkpoint(tmp_path / "ours.pt", tiny_model)
    assert main(["info", "--checkpoint", str(tmp_path / "ours.pt")]) == 0
    assert "leave no trace" not in capsys.readouterr().out


def test_save_checkpoint_stores_numpy_values_so_that_load_model_reads_them_back(tmp_path, tiny_model):
    """A numpy scalar metric in ``extra`` was written as a numpy object, which the safe loader then refused."""
    extra = {"valid_si_sdr": np.float64(3.25), "epochs": np.int64(4), "flag": np.bool_(True), "name": np.str_("a"),
             "curve": np.arange(3, dtype=np.float32), "nested": {"scores": [np.float32(1.5), (np.int16(2), None)]},
             "plain": {"t": torch.ones(2), "dtype": torch.float16, "size": torch.Size([2, 3]), "b": b"x", "c": 1j}}
    path = save_checkpoint(tmp_path / "np.pt", tiny_model, extra=extra)
    loaded = load_model(path)  # raised "not a plain tensor checkpoint ... numpy" before
    _same_output(tiny_model, loaded)
    raw = read_checkpoint(path)
    assert raw["valid_si_sdr"] == 3.25 and type(raw["valid_si_sdr"]) is float
    assert raw["epochs"] == 4 and type(raw["epochs"]) is int and raw["flag"] is True and raw["name"] == "a"
    assert torch.equal(raw["curve"], torch.arange(3, dtype=torch.float32))
    assert raw["nested"] == {"scores": [1.5, (2, None)]}
    assert torch.equal(raw["plain"]["t"], torch.ones(2))
    assert {k: v for k, v in raw["plain"].items() if k != "t"} == {"dtype": torch.float16, "size": torch.Size([2, 3]),
                                                                   "b": b"x", "c": 1j}


@pytest.mark.parametrize(("value", "named"), [(object(), "builtins.object"), (Path("x.wav"), "PosixPath"),
                                              (np.array(["a"]), "numpy.ndarray"),
                                              (np.datetime64("2020-01-01"), "numpy.datetime64")])
def test_save_checkpoint_refuses_what_load_model_could_not_read_and_writes_nothing(tmp_path, tiny_model, value,
                                                                                   named):
    path = tmp_path / "bad.pt"
    with pytest.raises(ValueError, match=r"^extra\['stats'\]\['x'\]\[1\] is a \S*" + named + r".*cannot hold") as info:
        save_checkpoint(path, tiny_model, extra={"stats": {"x": [1.0, value]}})
    assert "\n" not in str(info.value)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_load_model_carries_the_recommended_refinements_to_separator_save_and_export(tmp_path, tiny_model):
    """``Separator(load_model(path))``, ``save_checkpoint`` and the Python export lost the checkpoint's
    ``'separation'`` entry (only ``Separator.from_pretrained`` read it)."""
    from mossformer2.export import TorchScriptModel, export_torchscript
    from mossformer2.separation import Separator

    recommended = {"polarity_ensemble": True, "wiener_filter": False}
    path = save_checkpoint(tmp_path / "a.pt", tiny_model, extra={"separation": recommended})
    loaded = load_model(path)
    assert loaded.separation_settings == recommended
    assert Separator(loaded, device="cpu").refinements["polarity_ensemble"] is True
    resaved = save_checkpoint(tmp_path / "b.pt", loaded)
    assert read_checkpoint(resaved)["separation"] == recommended
    exported = export_torchscript(load_model(resaved), tmp_path / "b.ts.pt")
    assert TorchScriptModel(exported).separation_settings == recommended
    # An explicit entry wins over the model's; a model without settings writes none.
    explicit = save_checkpoint(tmp_path / "c.pt", loaded, extra={"separation": {"wiener_filter": True}})
    assert read_checkpoint(explicit)["separation"] == {"wiener_filter": True}
    assert "separation" not in read_checkpoint(save_checkpoint(tmp_path / "d.pt", tiny_model))
    assert load_model(tmp_path / "d.pt").separation_settings == {}


def test_load_model_says_which_fields_it_assumed_without_an_embedded_config(tmp_path, tiny_model):
    """A size of one's own without a config: a warning (it was an INFO log, which a Python user never saw, while
    the weights of a model trained with another group size ran with the official one)."""
    torch.save(tiny_model.state_dict(), tmp_path / "bare.pt")
    torch.save(_official_container(tiny_model), tmp_path / "official.pt")
    save_checkpoint(tmp_path / "ours.pt", tiny_model)
    for name in ("bare.pt", "official.pt"):
        with pytest.warns(UserWarning, match="assumed") as caught:
            loaded = load_model(tmp_path / name)
        message = str(caught[0].message)
        assert name in message and "sample_rate=16000" in message and "group_size=256" in message
        assert "dropout=0.1" in message and "pass config=" in message
        assert tiny_model.config.group_size != 256 and loaded.config.group_size == 256
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(tmp_path / "ours.pt")
        assert load_model(tmp_path / "bare.pt", config=tiny_model.config).config == tiny_model.config


def test_an_onnx_file_is_named_as_an_onnx_export(tmp_path):
    onnx = pytest.importorskip("onnx")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    data = onnx.helper.make_model(graph, producer_name="pytorch").SerializeToString()
    for name in ("model.onnx", "model.bin"):  # by its name, and by its content
        (tmp_path / name).write_bytes(data)
        for load in (read_checkpoint, load_model):
            with pytest.raises(ValueError, match=f"{name} is an ONNX export, not a checkpoint"):
                load(tmp_path / name)


def test_save_checkpoint_unwraps_a_compiled_model(tmp_path, tiny_model):
    compiled = torch.compile(tiny_model)  # compiles lazily: nothing runs here
    path = save_checkpoint(tmp_path / "c.pt", compiled)
    assert list(read_checkpoint(path)["model"]) == list(tiny_model.state_dict())
    _same_output(tiny_model, load_model(path))


def test_a_model_config_file_or_name_gives_a_bare_state_dict_its_architecture(tmp_path, tiny_model):
    """What a bare state dict's shapes cannot tell (group size, sample rate) comes from a YAML file: its own
    fields, or a training config's ``model:`` section; a wrong key is named."""
    import yaml

    from mossformer2.config_utils import ConfigError, read_model_config

    config = tiny_model.config.replace(sample_rate=8000)
    torch.save(tiny_model.state_dict(), tmp_path / "bare.pt")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(config.to_dict()))
    (tmp_path / "train.yml").write_text(yaml.safe_dump({"model": config.to_dict(), "optim": {"lr": 1e-3}}))
    for spec in ("model.yaml", "train.yml"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing assumed, nothing overridden
            loaded = load_model(tmp_path / "bare.pt", config=str(tmp_path / spec))
        assert loaded.config == config and config.group_size != 256
        _same_output(tiny_model, loaded)
    assert read_model_config("MossFormer2-S").num_mossformer_layer == 25
    # a training config's model: section as training reads it, presets (name:) included: the shipped 8 kHz recipe
    eight_k = read_model_config(Path(__file__).parents[1] / "configs" / "wsj0-2mix-8k.yaml")  # (a Path too)
    assert eight_k == mossformer2.models.get_config("MossFormer2").replace(sample_rate=8000)
    (tmp_path / "typo.yaml").write_text("groupsize: 64\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: .*unknown key\(s\) \['groupsize'\]"):
        read_model_config(str(tmp_path / "typo.yaml"))
    with pytest.raises(ConfigError, match="neither a known name .* nor a .yaml"):
        read_model_config("model.txt")


def test_a_given_config_that_differs_from_the_stored_one_is_named_in_a_warning(tmp_path, tiny_model):
    save_checkpoint(tmp_path / "ours.pt", tiny_model)
    other = tiny_model.config.replace(group_size=2 * tiny_model.config.group_size)
    with pytest.warns(UserWarning, match=f"overrides the one it was saved with: group_size "
                                         f"{tiny_model.config.group_size} -> {other.group_size}"):
        assert load_model(tmp_path / "ours.pt", config=other).config == other
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(tmp_path / "ours.pt", config=tiny_model.config)  # the same config: no word
    with pytest.raises(ValueError, match=r"^the given model config \(config=, --model-config\) does not fit .*ours.pt, "
                                         r"which was saved with its own \(encoder_embedding_dim 16 -> 512; .*\): "):
        load_model(tmp_path / "ours.pt", config="MossFormer2")
    torch.save(tiny_model.state_dict(), tmp_path / "bare.pt")  # no stored config: the shapes say what differs
    with pytest.raises(ValueError, match=r"^the given model config .* does not fit .*bare.pt, whose tensor shapes say "
                                         r"otherwise \(encoder_embedding_dim 16 -> 512; "):
        load_model(tmp_path / "bare.pt", config="MossFormer2")
    with warnings.catch_warnings():  # fine-tuning with another dropout: on purpose, no word
        warnings.simplefilter("error")
        load_model(tmp_path / "ours.pt", config=tiny_model.config.replace(dropout=0.3))


def _same_output(a, b, length=900):
    x = torch.randn(1, length)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_a_model_state_dict_container_key_is_read():
    """``{'model_state_dict': ..., 'optimizer_state_dict': ...}`` (the PyTorch tutorial layout) is a container."""
    model = build_model(make_tiny_config()).eval()
    container = {"model_state_dict": model.state_dict(), "optimizer_state_dict": {}, "epoch": 3}
    _same_output(model, load_model(container, config=model.config))


def test_keys_with_and_without_a_wrapper_prefix_load_together():
    """Only some keys under ``module.`` / ``_orig_mod.`` (no common prefix to peel): each key is stripped."""
    model = build_model(make_tiny_config()).eval()
    state = model.state_dict()
    mixed = {(f"module.{k}" if i % 2 else f"_orig_mod.{k}" if i % 3 else k): v
             for i, (k, v) in enumerate(state.items())}
    _same_output(model, load_model(mixed, config=model.config))


def test_a_fractional_expansion_factor_is_read_from_the_shapes():
    """infer_config: FLASH hidden width / D, not floor division (a 1.5 factor was read as 1.0)."""
    from mossformer2.checkpoint import infer_config

    config = make_tiny_config(expansion_factor=1.5)
    assert infer_config(build_model(config).state_dict()).expansion_factor == 1.5


def test_an_embedded_training_config_gives_its_model_section():
    """A checkpoint whose ``'config'`` is a whole training config: the ``model`` section is the architecture
    (its group_size, which the shapes cannot tell)."""
    config = make_tiny_config()
    model = build_model(config).eval()
    assert config.group_size != 256
    checkpoint = {"model": model.state_dict(), "config": {"model": config.to_dict(), "optim": {"lr": 1e-3}}}
    loaded = load_model(checkpoint)
    assert loaded.config == config
    _same_output(model, loaded)


def test_a_stored_config_that_predates_some_fields_is_not_reported_as_overridden(tmp_path):
    """A saved config without a field added later: given the same config, no override warning (only the fields both
    sides hold are compared)."""
    import warnings

    config = make_tiny_config()
    model = build_model(config).eval()
    older = {k: v for k, v in config.to_dict().items() if k != "conv_kernel_size"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_model({"model": model.state_dict(), "config": older}, config=config)
    assert loaded.config == config


def test_save_checkpoint_unwraps_nested_wrappers(tmp_path):
    """DataParallel around torch.compile: every wrapper layer is removed before saving."""
    from mossformer2 import save_checkpoint
    from mossformer2.checkpoint import read_checkpoint

    model = build_model(make_tiny_config()).eval()
    wrapped = torch.nn.DataParallel(torch.compile(model))  # (compiles lazily: nothing runs)
    path = save_checkpoint(tmp_path / "w.pt", wrapped)
    assert list(read_checkpoint(path)["model"]) == list(model.state_dict())


def test_info_counts_each_rotary_alias_once_in_the_element_count(tmp_path):
    """The rotary tables of layers 1 and up are aliases of layer 0's: the element count takes them once."""
    import re

    from mossformer2.checkpoint import checkpoint_summary

    model = build_model(make_tiny_config(num_mossformer_layer=3))
    state = model.state_dict()
    torch.save({"model": state}, tmp_path / "m.pt")
    alias = re.compile(r"layers\.[1-9]\d*\.rotary_pos_emb\.freqs$")
    assert sum(bool(alias.search(k)) for k in state) == 2
    assert checkpoint_summary(tmp_path / "m.pt")["num_elements"] == sum(
        v.numel() for k, v in state.items() if not alias.search(k))


def test_info_names_epoch_0_as_the_best_epoch(tmp_path):
    """A last.pt whose best validation was the first epoch (0, counting from 0): not 'none validated yet'."""
    from mossformer2 import save_checkpoint
    from mossformer2.checkpoint import checkpoint_summary

    path = save_checkpoint(tmp_path / "last.pt", build_model(make_tiny_config()), epoch=2, step=8,
                           extra={"trainer_state": {"epoch": 2, "step": 8, "best_metric": 4.5, "best_epoch": 0}})
    assert checkpoint_summary(path)["validation"] == ("2 epochs completed; best SI-SDRi 4.50 dB at epoch 0 "
                                                      "(counting from 0)")

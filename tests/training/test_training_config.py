"""Training config: shipped configs load and validate, unknown keys and bad values are rejected clearly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mossformer2.config_utils import ConfigError
from mossformer2.training.config import load_train_config, save_train_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_all_shipped_configs_are_present():
    names = {p.name for p in CONFIGS}
    assert {"wsj0-2mix.yaml", "libri2mix.yaml", "finetune_official.yaml", "mossformer2-s.yaml",
            "tiny.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path, tmp_path):
    cfg = load_train_config(path)
    cfg.validate()
    # The resolved config round-trips through YAML.
    save_train_config(cfg, tmp_path / "config.yaml")
    assert load_train_config(tmp_path / "config.yaml") == cfg


def test_named_model_with_overrides():
    cfg = load_train_config(CONFIGS[0].parent / "mossformer2-s.yaml", ["model.dropout=0.0"])
    assert cfg.model.encoder_embedding_dim == 384 and cfg.model.num_mossformer_layer == 25
    assert cfg.model.dropout == 0.0
    finetune = load_train_config(CONFIGS[0].parent / "finetune_official.yaml")
    assert finetune.optim.lr == 5e-5 and finetune.trainer.init_from


def _write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_rejected_with_its_name(tmp_path):
    path = _write(tmp_path, {"data": {"synthetic": True, "segmnt_seconds": 2.0}})
    with pytest.raises(ConfigError, match="segmnt_seconds") as err:
        load_train_config(path)
    assert "allowed keys" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ConfigError, match="optimizer"):
        load_train_config(_write(tmp_path, {"optimizer": {}, "data": {"synthetic": True}}))
    with pytest.raises(ConfigError, match="model.name"):
        load_train_config(_write(tmp_path, {"model": {"name": "nope"}, "data": {"synthetic": True}}))


def test_overrides_and_type_errors(tmp_path):
    path = _write(tmp_path, {"data": {"synthetic": True}})
    cfg = load_train_config(path, ["optim.lr=1e-3", "trainer.precision=bf16", "data.batch_size=3"])
    assert cfg.optim.lr == 1e-3 and cfg.trainer.precision == "bf16" and cfg.data.batch_size == 3
    with pytest.raises(ConfigError, match="precision"):
        load_train_config(path, ["trainer.precision=fp8"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_train_config(path, ["data.batch_size=two"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_train_config(path, ["data.batch_size=0"])
    for override in ("optim.lr=nan", "data.segment_seconds=.nan", "optim.grad_clip=nan"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_train_config(path, [override])
    for override in ("trainer.max_steps=none", "trainer.max_steps=None", "optim.grad_clip="):  # YAML says null
        with pytest.raises(ConfigError, match=r"got '(none|None|)' \(where a setting may be empty, write null"):
            load_train_config(path, [override])
    assert load_train_config(path, ["trainer.max_steps=null"]).trainer.max_steps is None


def test_data_section_consistency(tmp_path):
    with pytest.raises(ConfigError, match="data.train"):
        load_train_config(_write(tmp_path, {}))
    with pytest.raises(ConfigError, match="validation data"):
        load_train_config(_write(tmp_path, {"data": {"dynamic_mixing": {"train_utterances": "x"}}}))
    with pytest.raises(ConfigError, match="sample_rate"):
        load_train_config(_write(tmp_path, {"data": {"synthetic": True, "sample_rate": 8000}}))
    with pytest.raises(ConfigError, match="gain_db"):
        load_train_config(_write(tmp_path, {"data": {"dynamic_mixing": {
            "train_utterances": "a", "valid_utterances": "b", "gain_db": [3, -3]}}}))
    with pytest.raises(ConfigError, match="data.valid .* or data.dynamic_mixing.valid_utterances"):
        load_train_config(_write(tmp_path, {"data": {"valid": "cv.scp", "dynamic_mixing": {
            "train_utterances": "a", "valid_utterances": "b"}}}))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_train_config("/nonexistent/config.yaml")
    with pytest.raises(ConfigError, match="is a folder: give the YAML file"):  # it said "not found"
        load_train_config(tmp_path)


def test_unknown_override_key_is_reported_as_an_override_not_as_the_yaml_file(tmp_path):
    path = _write(tmp_path, {"data": {"synthetic": True}})
    for override, words in (("foo.bar=1", "unknown key 'foo'"), ("trainer.max_epoch=3", "unknown key 'max_epoch'"),
                            ("data.dynamic_mixing.nois=x", "unknown key 'nois' in data.dynamic_mixing"),
                            ("trainer.max_epochs.x=3", "trainer.max_epochs is a value, not a section"),
                            ("optim.lr=[1,", "not valid YAML")):
        with pytest.raises(ConfigError) as err:
            load_train_config(path, [override])
        message = str(err.value)
        assert message.startswith(f"command-line override {override!r}") and words in message, message
        assert str(path) not in message
    # a message naming the section an override lies in blames that override, not an unrelated one with it
    with pytest.raises(ConfigError) as err:
        load_train_config(path, ["trainer.max_epochs=1", "data.dynamic_mixing.train_utterances=spk"])
    assert str(err.value).startswith("command-line override 'data.dynamic_mixing.train_utterances=spk': ")
    # ... and of several overrides in that section, the one without which the error goes away
    (tmp_path / "syn").mkdir()
    synthetic = _write(tmp_path / "syn", {"data": {"synthetic": True, "dynamic_mixing": {"noise_prob": 1.0}}})
    with pytest.raises(ConfigError) as err:
        load_train_config(synthetic, ["data.synthetic=false", "data.dynamic_mixing.noise_prob=0.5"])
    assert str(err.value).startswith("command-line override 'data.synthetic=false': ")
    # known keys, the preset name and optional sections still pass
    cfg = load_train_config(path, ["model.name=MossFormer2-S", "data.dynamic_mixing.noise_prob=0.5"])
    assert cfg.model.num_mossformer_layer == 25 and cfg.data.dynamic_mixing.noise_prob == 0.5


def test_duplicate_yaml_key_is_an_error_naming_it_and_its_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("data:\n  synthetic: true\noptim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 5: duplicate key 'lr' \(already set on line 4\)"):
        load_train_config(path)
    path.write_text("trainer:\n  max_epochs: 3\ndata:\n  synthetic: true\ntrainer:\n  seed: 1\n")
    with pytest.raises(ConfigError, match="line 5: duplicate key 'trainer'"):
        load_train_config(path)
    # the same key in different mappings, and a key overriding a merged (<<) one, are fine
    path.write_text("data:\n  synthetic: true\n  batch_size: 2\noptim:\n  lr: 1.0e-3\n"
                    "trainer: &t {seed: 1, max_epochs: 3}\n")
    assert load_train_config(path).data.batch_size == 2
    from mossformer2.config_utils import safe_load_yaml

    assert safe_load_yaml("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n")["b"] == {"x": 3, "y": 2}


def test_segment_shorter_than_the_models_minimum_input_is_a_config_error():
    import torch

    from mossformer2.config_utils import to_dict
    from mossformer2.models import build_model
    from mossformer2.models.config import tiny_test_config
    from mossformer2.training.config import train_config_from_dict

    model = tiny_test_config(sample_rate=8000, encoder_kernel_size=16)
    net = build_model(model)
    assert net.min_input_length == 24  # kernel 16 + hop 8 samples: 3 ms at 8 kHz

    def config(**data):
        return train_config_from_dict({"model": to_dict(model), "data": {"synthetic": True, "sample_rate": 8000,
                                                                          **data}})

    with pytest.raises(ConfigError, match=r"data.segment_seconds \(0.002 s = 16 samples at 8000 Hz\).*at least 24"):
        config(segment_seconds=0.002)
    with pytest.raises(ConfigError, match="data.max_valid_seconds"):
        config(max_valid_seconds=0.001)
    with pytest.raises(ConfigError, match="data.dynamic_mixing.valid_max_seconds"):
        config(dynamic_mixing={"valid_max_seconds": 0.001})
    shortest = config(segment_seconds=0.003)  # exactly the minimum: the network takes it
    samples = int(round(shortest.data.segment_seconds * 8000))
    assert net(torch.zeros(1, samples)).shape == (1, 2, samples)


@pytest.mark.parametrize("override, message", [
    ("optim.early_stop_patience=0", "optim.early_stop_patience must be >= 1 or null"),
    ("optim.plateau_patience=-1", "optim.plateau_patience must be >= 0, got -1"),
    ("optim.min_lr=-1", "optim.min_lr must be >= 0, got -1.0"),
    ("optim.eps=-1", "optim.eps must be > 0, got -1.0"),
    ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
    ("data.segment_seconds=.inf", "data.segment_seconds must be a finite number"),
    ("data.max_valid_seconds=.inf", "data.max_valid_seconds must be a finite number"),
    ("data.dynamic_mixing.valid_max_seconds=-.inf", "data.dynamic_mixing.valid_max_seconds must be a finite number"),
    ("data.dynamic_mixing.gain_db=[0,.inf]", "data.dynamic_mixing.gain_db must be a finite number, got [0.0, inf]"),
])
def test_values_that_would_break_training_are_errors_naming_the_override(tmp_path, override, message):
    path = _write(tmp_path, {"data": {"synthetic": True}})
    with pytest.raises(ConfigError) as err:
        load_train_config(path, [override])
    assert str(err.value).startswith(f"command-line override {override!r}: {message}"), str(err.value)


def test_errors_caused_by_an_override_name_it_not_the_yaml_file(tmp_path):
    path = _write(tmp_path, {"data": {"synthetic": True}, "optim": {"lr": 1e-3}})
    for override, words in (("optim.lr=-1", "optim.lr must be > 0, got -1.0"),
                            ("optim.lr=abc", "config.optim.lr: expected a number, got 'abc'")):
        with pytest.raises(ConfigError) as err:
            load_train_config(path, ["data.batch_size=2", override])
        assert str(err.value) == f"command-line override {override!r}: {words}"
    # A value that is not YAML is named once (the override was prefixed twice).
    with pytest.raises(ConfigError) as err:
        load_train_config(path, ["optim.lr=["])
    assert str(err.value).count("command-line override 'optim.lr=['") == 1, str(err.value)
    # An error of the file itself is still the file's, whatever the overrides.
    bad = _write(tmp_path, {"data": {"synthetic": True}, "optim": {"lr": -1}})
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: optim.lr must be > 0"):
        load_train_config(bad, ["data.batch_size=2"])


def test_errors_inside_an_optional_section_name_the_key(tmp_path):
    typo = _write(tmp_path, {"data": {"dynamic_mixing": {"train_utterance": "a", "valid_utterances": "b"}}})
    with pytest.raises(ConfigError) as err:
        load_train_config(typo)
    assert "config.data.dynamic_mixing: unknown key(s) ['train_utterance']; allowed keys are" in str(err.value)
    path = _write(tmp_path, {"data": {"dynamic_mixing": {"train_utterances": "a", "valid_utterances": "b"}}})
    for override, words in (("data.dynamic_mixing.examples_per_epoch=abc", "examples_per_epoch: expected an integer"),
                            ("data.dynamic_mixing.speed_perturb=[x,1]", "speed_perturb[0]: expected a number"),
                            ("optim.grad_clip=abc", "config.optim.grad_clip: expected a number, got 'abc'")):
        with pytest.raises(ConfigError, match=re.escape(words)) as err:
            load_train_config(path, [override])
        assert "does not match" not in str(err.value)


def test_max_nonfinite_steps_is_typed_and_validated(tmp_path):
    path = _write(tmp_path, {"data": {"synthetic": True}})
    assert load_train_config(path).trainer.max_nonfinite_steps == 100
    assert load_train_config(path, ["trainer.max_nonfinite_steps=null"]).trainer.max_nonfinite_steps is None
    with pytest.raises(ConfigError, match="trainer.max_nonfinite_steps must be > 0 or null"):
        load_train_config(path, ["trainer.max_nonfinite_steps=0"])


def test_a_negative_seed_or_example_count_is_refused_before_the_run_starts(tmp_path):
    """trainer.seed=-1 passed validation and failed once the run had made its folder ("expected non-negative
    integer", from NumPy, naming neither key nor value)."""
    path = _write(tmp_path, {"data": {"synthetic": True}})
    for override, words in (("trainer.seed=-1", "trainer.seed must be from 0 to 2**63 - 1, got -1"),
                            ("trainer.audio_examples=-1", "trainer.audio_examples must be >= 0, got -1")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_train_config(path, [override])
    assert load_train_config(path, ["trainer.seed=0", "trainer.audio_examples=0"]).trainer.seed == 0


def test_with_absolute_paths_resolves_every_path_against_the_current_folder(tmp_path, monkeypatch):
    from mossformer2.training.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, {"data": {"valid": "cv.scp", "dynamic_mixing": {
        "train_utterances": ["spk/train", "/abs/list.txt"], "noise": "noise"}},
        "trainer": {"init_from": "pre/model.pt"}})
    cfg = load_train_config(path)
    absolute = with_absolute_paths(cfg)
    dm = absolute.data.dynamic_mixing
    assert absolute.data.valid == str(tmp_path / "cv.scp") and absolute.data.train is None
    assert dm.train_utterances == [str(tmp_path / "spk" / "train"), "/abs/list.txt"]
    assert dm.noise == str(tmp_path / "noise") and dm.valid_utterances is None
    assert absolute.trainer.init_from == str(tmp_path / "pre" / "model.pt")
    # Nothing else changes, and the user's config object is left as it was.
    assert absolute.optim == cfg.optim and absolute.model == cfg.model and cfg.data.valid == "cv.scp"


def test_setting_changes_names_dotted_keys_and_missing_sides():
    from mossformer2.config_utils import setting_changes

    old = {"batch_size": 4, "dynamic_mixing": {"gain_db": [-2.5, 2.5], "noise": None}, "gone": 1}
    new = {"batch_size": 8, "dynamic_mixing": {"gain_db": [-5, 5], "noise": None}, "added": True}
    assert [f"{k} {a!r} -> {b!r}" for k, a, b in setting_changes(old, new, "data")] == [
        "data.added (not set) -> True", "data.batch_size 4 -> 8", "data.dynamic_mixing.gain_db [-2.5, 2.5] -> [-5, 5]",
        "data.gone 1 -> (not set)"]
    assert [k for k, _, _ in setting_changes(old, new, "data", shared_only=True)] == [
        "data.batch_size", "data.dynamic_mixing.gain_db"]
    assert setting_changes(None, {"a": 1}) == setting_changes({}, {"a": 1})
    assert len(setting_changes({"a": 1}, None)) == 1

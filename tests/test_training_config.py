"""Training config: shipped configs load and validate, unknown keys and bad values are rejected clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mossformer2.config_utils import ConfigError
from mossformer2.training.config import load_train_config, save_train_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


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


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_train_config("/nonexistent/config.yaml")

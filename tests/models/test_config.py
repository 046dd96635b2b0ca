"""models/config.py: named configs and config validation."""

from __future__ import annotations

from mossformer2.models.config import NAMED_CONFIGS, get_config


def test_a_named_config_is_a_copy_the_caller_may_change():
    """Changing what get_config returned (a sweep setting dropout) leaves the preset as it was."""
    config = get_config("MossFormer2")
    config.dropout = 0.0
    assert get_config("MossFormer2").dropout == 0.1 and NAMED_CONFIGS["MossFormer2"].dropout == 0.1


def test_an_odd_flash_hidden_width_is_a_config_error():
    """mossformer_sequence_dim * expansion_factor must be even (16 * 1.0625 = 17 is not)."""
    import pytest

    from mossformer2.config_utils import ConfigError
    from mossformer2.models.config import tiny_test_config

    with pytest.raises(ConfigError, match="must be an even integer"):
        tiny_test_config(expansion_factor=1.0625)
    assert tiny_test_config(expansion_factor=1.125).expansion_factor == 1.125  # 18: fine

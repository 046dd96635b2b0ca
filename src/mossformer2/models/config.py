"""Typed configuration of the MossFormer2 separation network.

The official MossFormer2_SS_16K exposes five arguments (encoder_embedding_dim, mossformer_sequence_dim,
num_mossformer_layer, encoder_kernel_size, num_spks) and hard-codes the rest. We expose the hard-coded
internals too, with the official values as defaults, so that small models of our own can shrink them; a
checkpoint of the official architecture always uses the defaults.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

from mossformer2.config_utils import ConfigError, from_dict, to_dict


def min_input_length(encoder_kernel_size: int) -> int:
    """Fewest input samples the network takes: two encoder frames (kernel + hop), since its norms take
    statistics over time."""
    return encoder_kernel_size + encoder_kernel_size // 2


@dataclass
class MossFormer2Config:
    """Sizes of a MossFormer2 network; the defaults are the official MossFormer2_SS_16K (55.7 M parameters).

    ``MossFormer2Config()`` is the official network, ``get_config("MossFormer2-S")`` its 37.8 M size; small
    models of our own shrink the internals too (``encoder_embedding_dim`` must equal
    ``mossformer_sequence_dim``, ``encoder_kernel_size`` must be even). Invalid values raise ``ConfigError``
    on construction. ``from_dict`` / ``to_dict`` convert to and from the dict stored in checkpoints.
    """

    encoder_embedding_dim: int = 512  # E: encoder filters
    mossformer_sequence_dim: int = 512  # D: width of the MossFormer blocks (official code needs E == D)
    num_mossformer_layer: int = 24  # L: number of (FLASH, gated FSMN) pairs
    encoder_kernel_size: int = 16  # K: encoder/decoder kernel; hop is K // 2
    num_spks: int = 2  # S: output speakers
    sample_rate: int = 16000  # only used by I/O code
    # Internals fixed in the official code (defaults = official values).
    group_size: int = 256  # FLASH local attention group length (frames)
    query_key_dim: int = 128
    expansion_factor: float = 4.0  # FLASH hidden = D * expansion_factor
    rotary_dim: int = 32  # rotated features of q/k
    fsmn_inner_dim: int = 256  # gated FSMN bottleneck
    fsmn_lorder: int = 20  # FSMN memory order; dilated conv kernel = 2 * lorder - 1
    conv_kernel_size: int = 17  # depth-wise conv in ConvModule
    dropout: float = 0.1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = ["encoder_embedding_dim", "mossformer_sequence_dim", "num_mossformer_layer",
                    "encoder_kernel_size", "num_spks", "sample_rate", "group_size", "query_key_dim",
                    "rotary_dim", "fsmn_inner_dim", "fsmn_lorder", "conv_kernel_size"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"MossFormer2Config.{name} must be a positive integer, got {value!r}")
            # A NumPy scalar (a sweep's value) as a plain number: checkpoints store the config, and torch.load with
            # weights_only=True reads no NumPy scalars back.
            setattr(self, name, int(value))
        if self.encoder_embedding_dim != self.mossformer_sequence_dim:
            raise ConfigError(
                "MossFormer2Config: encoder_embedding_dim must equal mossformer_sequence_dim "
                f"(got {self.encoder_embedding_dim} and {self.mossformer_sequence_dim}); the official "
                "decoder is built with the sequence width but receives the encoder width"
            )
        if self.encoder_kernel_size < 2 or self.encoder_kernel_size % 2:
            raise ConfigError(f"MossFormer2Config.encoder_kernel_size must be even and >= 2, "
                              f"got {self.encoder_kernel_size}")
        if self.mossformer_sequence_dim % 2:
            raise ConfigError("MossFormer2Config.mossformer_sequence_dim must be even (token shift, "
                              "sinusoidal table)")
        for name in ("expansion_factor", "dropout"):
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                setattr(self, name, value if type(value) in (int, float) else float(value))
        if isinstance(self.expansion_factor, bool) or not isinstance(self.expansion_factor, (int, float)) \
                or not self.expansion_factor > 0:
            raise ConfigError(f"MossFormer2Config.expansion_factor must be a positive number, "
                              f"got {self.expansion_factor!r}")
        hidden = self.mossformer_sequence_dim * self.expansion_factor
        if not float(hidden).is_integer() or int(hidden) % 2:
            raise ConfigError("MossFormer2Config.expansion_factor * mossformer_sequence_dim must be an even integer")
        if self.rotary_dim % 2 or self.rotary_dim > self.query_key_dim:
            raise ConfigError("MossFormer2Config.rotary_dim must be even and <= query_key_dim")
        if self.conv_kernel_size % 2 == 0:
            raise ConfigError("MossFormer2Config.conv_kernel_size must be odd (same-length padding)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("MossFormer2Config.dropout must be in [0, 1)")

    @property
    def hop_size(self) -> int:
        return self.encoder_kernel_size // 2

    @property
    def min_input_length(self) -> int:
        """Fewest input samples the network takes (:func:`min_input_length`)."""
        return min_input_length(self.encoder_kernel_size)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MossFormer2Config:
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **changes: Any) -> MossFormer2Config:
        return dataclasses.replace(self, **changes)


NAMED_CONFIGS: dict[str, MossFormer2Config] = {
    # Official MossFormer2_SS_16K: 55,735,410 parameters.
    "MossFormer2": MossFormer2Config(),
    # Paper's small size: 37,755,382 parameters.
    "MossFormer2-S": MossFormer2Config(encoder_embedding_dim=384, mossformer_sequence_dim=384,
                                       num_mossformer_layer=25),
}


def tiny_test_config(**changes: Any) -> MossFormer2Config:
    """A few-thousand-parameter network that exercises every code path in milliseconds (tests, benchmark dry
    runs); it is far too small to separate speech."""
    base = dict(encoder_embedding_dim=16, mossformer_sequence_dim=16, num_mossformer_layer=1, query_key_dim=16,
                rotary_dim=8, fsmn_inner_dim=16, fsmn_lorder=4, group_size=64)
    return MossFormer2Config(**{**base, **changes})


_ALIASES = {"mossformer2_ss_16k": "MossFormer2", "mossformer2": "MossFormer2",
            "mossformer2-s": "MossFormer2-S", "mossformer2_s": "MossFormer2-S"}


def resolve_config(name_or_config: str | MossFormer2Config | dict | None) -> MossFormer2Config:
    """The config that ``build_model`` / ``MossFormer2(...)`` is given as a name, a config (validated again: a
    dataclass may have been changed after it was made), a dict of its fields or None (the official one)."""
    if name_or_config is None:
        return MossFormer2Config()
    if isinstance(name_or_config, MossFormer2Config):
        # A copy (replace validates it): a model kept the caller's object, so a sweep that changed it for the next
        # model changed the config of the models already built, which then saved checkpoints that did not load.
        return dataclasses.replace(name_or_config)
    if isinstance(name_or_config, dict):
        return MossFormer2Config.from_dict(name_or_config)
    if isinstance(name_or_config, str):
        return get_config(name_or_config)
    raise TypeError(f"expected a model name, MossFormer2Config or dict of its fields, "
                    f"got {type(name_or_config).__name__}")


def get_config(name: str) -> MossFormer2Config:
    """A named configuration (case-insensitive; ``MossFormer2_SS_16K`` is an alias of ``MossFormer2``)."""
    key = _ALIASES.get(name.lower(), name)
    if key not in NAMED_CONFIGS:
        raise ValueError(f"unknown model name {name!r}; known names: {sorted(NAMED_CONFIGS)}")
    return dataclasses.replace(NAMED_CONFIGS[key])


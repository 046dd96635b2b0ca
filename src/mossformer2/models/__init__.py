"""The MossFormer2 network and its configuration.

The configuration needs no torch (``mossformer2.runtime`` reads it from ONNX files); the network is imported on
first use of ``MossFormer2``, ``build_model`` or ``count_parameters``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mossformer2.models.config import NAMED_CONFIGS, MossFormer2Config, get_config

if TYPE_CHECKING:
    from mossformer2.models.mossformer import MossFormer2


def build_model(name_or_config: str | MossFormer2Config | dict | None = "MossFormer2") -> MossFormer2:
    """A freshly initialised model from a named config (``"MossFormer2"``, ``"MossFormer2-S"``), a
    ``MossFormer2Config`` or a dict of its fields (the same as ``MossFormer2(name_or_config)``)."""
    from mossformer2.models.mossformer import MossFormer2

    return MossFormer2(name_or_config)


def count_parameters(model: MossFormer2) -> int:
    """Unique parameters (the shared rotary table counted once), as the official count."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["NAMED_CONFIGS", "MossFormer2", "MossFormer2Config", "build_model", "count_parameters", "get_config"]


def __getattr__(name: str) -> Any:
    if name == "MossFormer2":
        from mossformer2.models.mossformer import MossFormer2

        return MossFormer2
    raise AttributeError(f"module 'mossformer2.models' has no attribute {name!r}")

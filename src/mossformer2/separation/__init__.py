"""Separation of real recordings: the ``Separator`` and its stitching of long audio."""

from __future__ import annotations

from mossformer2.separation.separator import (
    Separator,
    load_separation_model,
    output_paths,
    write_separation,
)

__all__ = ["Separator", "load_separation_model", "output_paths", "write_separation"]

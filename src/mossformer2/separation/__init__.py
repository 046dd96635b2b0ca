"""Separation of real recordings: the ``Separator`` and its stitching of long audio."""

from __future__ import annotations

from mossformer2.separation.loading import load_separation_model
from mossformer2.separation.outputs import output_paths, write_separation
from mossformer2.separation.separator import Separator

__all__ = ["Separator", "load_separation_model", "output_paths", "write_separation"]

"""What a model file recommends for separating with it: the refinements of :mod:`mossformer2.separation.refine`.

A checkpoint's ``"separation"`` entry, an ONNX file's ``mossformer2_separation`` metadata and a TorchScript
file's ``separation.json`` (the last two written from the checkpoint's) hold ``{name: bool}`` for these names.
Kept apart from the refinements themselves so that checkpoint and export I/O read it without the separation
package (no torch, no scipy).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

REFINEMENTS = ("polarity_ensemble", "wiener_filter", "mixture_consistency")


def parse_export_json(text: str, source: str | Path, key: str) -> Any:
    """The JSON value an export stores under ``key`` (its config, its recommended settings); a ValueError naming
    the file and the key if it is not JSON (a damaged or hand-edited file gave only the JSON parser's words)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: its '{key}' metadata is not valid JSON ({err}): export the model again "
                         "with `mossformer2 export`") from None


def recommended_refinements(entry: Any, source: str | Path = "checkpoint") -> dict[str, bool]:
    """Check a model file's recommendation ``{name: bool}`` (``None``: none). Unknown names are ignored with a
    warning (a newer version may know more); anything else wrong is a ``ValueError`` naming ``source``."""
    if entry is None:
        return {}
    if not isinstance(entry, dict):
        raise ValueError(f"{source}: 'separation' must map setting names to true/false, got {type(entry).__name__}")
    unknown = sorted(set(map(str, entry)) - set(REFINEMENTS))
    if unknown:
        warnings.warn(f"{source}: ignoring unknown separation settings {unknown} (known: {list(REFINEMENTS)})",
                      stacklevel=2)
    wrong = [k for k in REFINEMENTS if k in entry and not isinstance(entry[k], bool)]
    if wrong:
        raise ValueError(f"{source}: separation settings {wrong} must be true or false")
    return {k: entry[k] for k in REFINEMENTS if k in entry}

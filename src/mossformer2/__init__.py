"""mossformer2: monaural speech separation with MossFormer2.

Public API::

    model = mossformer2.build_model("MossFormer2")          # or a MossFormer2Config
    model = mossformer2.load_model("last_best_checkpoint.pt")
    sep = mossformer2.Separator(model)                       # long files, any rate/channels
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["MossFormer2", "MossFormer2Config", "Separator", "build_model", "load_model", "save_checkpoint",
           "__version__"]

if TYPE_CHECKING:
    from mossformer2.checkpoint import load_model, save_checkpoint
    from mossformer2.models import MossFormer2, MossFormer2Config, build_model
    from mossformer2.separation import Separator

# Imported on first use, so that `import mossformer2` is cheap and an ONNX deployment (mossformer2.runtime +
# mossformer2.separation) never imports torch.
_LAZY = {"load_model": "mossformer2.checkpoint", "save_checkpoint": "mossformer2.checkpoint",
         "MossFormer2": "mossformer2.models", "MossFormer2Config": "mossformer2.models",
         "build_model": "mossformer2.models", "Separator": "mossformer2.separation"}


# Submodules reachable as attributes after a bare `import mossformer2` (imported on first access, like the names).
_SUBMODULES = ("audio", "checkpoint", "cli", "config_utils", "data", "distributed", "evaluation", "export", "hub",
               "losses", "metrics", "models", "plotting", "pretrained", "runtime", "separation", "separation_settings",
               "training", "utils")


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # also binds it in this module's namespace
    raise AttributeError(f"module 'mossformer2' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(_SUBMODULES) | {k for k in globals() if not k.startswith("_")} - {
        "Any", "TYPE_CHECKING", "annotations"})

"""mossformer2: monaural speech separation with MossFormer2.

Public API::

    model = mossformer2.build_model("MossFormer2")          # or a MossFormer2Config
    model = mossformer2.load_model("last_best_checkpoint.pt")
    sep = mossformer2.Separator(model)                       # long files, any rate/channels
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mossformer2.checkpoint import load_model, save_checkpoint
from mossformer2.models import MossFormer2, MossFormer2Config, build_model

__version__ = "0.1.0"

__all__ = ["MossFormer2", "MossFormer2Config", "Separator", "build_model", "load_model", "save_checkpoint",
           "__version__"]

if TYPE_CHECKING:
    from mossformer2.separation import Separator


def __getattr__(name: str) -> Any:
    # Separator pulls in audio I/O; import it lazily so that model-only users never load it.
    if name == "Separator":
        from mossformer2.separation import Separator

        return Separator
    raise AttributeError(f"module 'mossformer2' has no attribute {name!r}")

"""The small separation model that ships inside the package (see MODEL_CARD.md beside this file)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRETRAINED_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_NAME = "mossformer2-tiny-offline-16k"
DEFAULT_MODEL_FILE = PRETRAINED_DIR / f"{DEFAULT_MODEL_NAME}.pt"


def default_model_path() -> Path:
    """Path of the shipped checkpoint; a clear error if the installation lacks it."""
    if not DEFAULT_MODEL_FILE.is_file():
        raise FileNotFoundError(
            f"the shipped model {DEFAULT_MODEL_FILE.name} is missing from this installation "
            f"({PRETRAINED_DIR}); reinstall mossformer2 or pass --checkpoint PATH"
        )
    return DEFAULT_MODEL_FILE


def load_default_model(device: str | torch.device = "cpu") -> torch.nn.Module:
    """The shipped model in eval mode, with its recommended ``separation_settings`` (see ``Separator``)."""
    from mossformer2.separation import load_separation_model

    return load_separation_model(None, device)

"""Checks and conversions of what a ``Separator`` is given: audio arrays, sample rates and option choices."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mossformer2.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, mean_square, pcm_to_float, to_mono
from mossformer2.utils import loaded_torch

if TYPE_CHECKING:
    import torch


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def is_real_number(value: Any) -> bool:
    """A real number (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_rate(name: str, rate: Any) -> int:
    """``rate`` (a number, a NumPy scalar or a 0-d tensor) as an int, or a ValueError naming ``name`` unless it is
    a whole number of Hz from ``MIN_SAMPLE_RATE`` to ``MAX_SAMPLE_RATE``."""
    if hasattr(rate, "item") and getattr(rate, "ndim", None) == 0:  # torch / NumPy 0-d
        rate = rate.item()
    whole = (is_real_number(rate) and math.isfinite(rate)
             and rate == int(rate))
    if whole and MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        return int(rate)
    header = name == "sample_rate" and whole and rate > 0  # as read_audio returns it for a file
    raise ValueError(f"{name} must be a whole number of Hz from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} (e.g. "
                     f"16000), got {rate!r}" + (": a file with a broken header?" if header else ""))


def as_channels_first(wave: np.ndarray | torch.Tensor) -> np.ndarray:
    """Validate and convert ``[T]`` / ``[C, T]`` (numpy or torch) to float32 numpy ``[C, T]``."""
    torch = loaded_torch()  # a tensor exists only if torch is loaded: never import it here
    if torch is not None and isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu()
        wave = (wave.float() if wave.is_floating_point() else wave).numpy()  # NumPy has no bfloat16
    wave = pcm_to_float(np.asarray(wave))
    if wave.ndim == 1:
        wave = wave[None]
    if wave.ndim != 2:
        raise ValueError(f"expected audio [T] or [C, T], got shape {wave.shape}")
    if wave.shape[-1] == 0:
        raise ValueError("empty audio: no samples")
    if wave.shape[0] > wave.shape[1]:
        raise ValueError(f"audio of shape {wave.shape} has more channels than samples; pass [C, T] "
                         "(channels first), e.g. wave.T")
    if not np.isfinite(wave).all():
        raise ValueError("audio contains NaN or infinite samples")
    return wave  # all zeros is allowed: silent speakers come out (an unused channel, a muted clip in a batch)


def tensor_device(raw: Any) -> Any:
    """The device of a torch tensor, else None (what ``as_input_kind`` needs of an input: not the input itself)."""
    torch = loaded_torch()
    return raw.device if torch is not None and isinstance(raw, torch.Tensor) else None


def as_input_kind(result: np.ndarray, device: Any) -> Any:
    """``result`` as the kind of array its input was: a torch tensor on ``device`` (``tensor_device`` of the
    input), or as is for ``None`` (NumPy input)."""
    if device is None:
        return result
    import torch

    return torch.from_numpy(result).to(device)


def channels_cancel(wave: np.ndarray, mono: np.ndarray | None = None) -> bool:
    """Whether the channels of ``wave`` ``[C, T]`` cancel in their mono downmix ``mono`` (default: their mean), e.g.
    one channel wired in reverse polarity: the mix is over 60 dB below the loudest channel."""
    mono = to_mono(wave) if mono is None else mono
    loudest = float(np.sqrt(mean_square(wave)).max())
    return loudest > 0 and float(np.sqrt(mean_square(mono))) < 1e-3 * loudest

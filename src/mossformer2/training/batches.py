"""Batches as the network takes them, in training and in validation: at least its minimum input length, with the
true lengths of zero-padded utterances (the loss and the scores keep those)."""

from __future__ import annotations

import torch


def fit_to_model(mix: torch.Tensor, sources: torch.Tensor | None, lengths: torch.Tensor, min_length: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A batch ``mix [B, T]`` / ``sources [B, S, T]`` shorter than the network's minimum input zero-padded to it,
    and the lengths ``[B]`` the model takes (each at least the minimum; None when nothing is padded). The loss and
    the scores keep the true ``lengths``: utterances that short are scored on their own samples."""
    short = min_length - mix.shape[-1]
    if short > 0:
        mix = torch.nn.functional.pad(mix, (0, short))
        sources = None if sources is None else torch.nn.functional.pad(sources, (0, short))
    return mix, sources, padded_lengths(lengths.clamp(min=min_length), mix)


def padded_lengths(lengths: torch.Tensor, mix: torch.Tensor) -> torch.Tensor | None:
    """The true lengths ``[B]`` of a zero-padded batch ``mix [B, T]`` (the model then ignores the padding), or None
    if none is padded."""
    return lengths if bool((lengths < mix.shape[-1]).any()) else None

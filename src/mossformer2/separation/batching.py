"""Batching of whole short inputs.

MossFormer2 normalises over time (GroupNorm over all frames, InstanceNorm in the FSMN) and attends over all
frames, so plain zero padding changes an item's output (a 10 % pad moved it by about -28 dB relative). Our
network takes the true ``lengths`` of a zero-padded batch and restricts every statistic to each item's frames,
so items of any length share a forward pass, sorted by length to keep padding small. Models without that
(exported ONNX graphs, the official module) only batch inputs of *equal* length.
"""

from __future__ import annotations

from collections import defaultdict


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (ties keep input order), cut into consecutive batches of ``batch_size``.

    For models that take ``lengths``: each batch is zero-padded to its longest item.
    """
    _check_batch_size(batch_size)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def equal_length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size`` items of identical length, sorted by length."""
    _check_batch_size(batch_size)
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, length in enumerate(lengths):
        by_length[length].append(index)
    batches: list[list[int]] = []
    for length in sorted(by_length):
        indices = by_length[length]
        batches.extend(indices[i:i + batch_size] for i in range(0, len(indices), batch_size))
    return batches


def make_batches(lengths: list[int], batch_size: int, padded: bool) -> list[list[int]]:
    """``length_sorted_batches`` when the model takes padded batches (``padded``), else ``equal_length_batches``."""
    return length_sorted_batches(lengths, batch_size) if padded else equal_length_batches(lengths, batch_size)

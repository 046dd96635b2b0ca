"""Batching of examples of different lengths."""

from __future__ import annotations

import torch


def collate_fn(examples: list[dict | None]) -> dict:
    """Zero-pad a list of examples to the longest one.

    Returns ``{"mix": [B, T], "sources": [B, S, T], "lengths": [B] (int64), "ids": list[str],
    "skipped": int}``; ``None`` examples (unreadable files that were skipped) are dropped and counted in
    ``skipped``, so a batch may hold fewer than ``batch_size`` examples, or none (``mix`` is then ``[0, 0]``).
    """
    kept = [e for e in examples if e is not None]
    skipped = len(examples) - len(kept) + sum(int(e.get("skipped", 0)) for e in kept)
    if not kept:
        return {"mix": torch.zeros(0, 0), "sources": torch.zeros(0, 0, 0), "lengths": torch.zeros(0, dtype=torch.long),
                "ids": [], "skipped": skipped}
    lengths = torch.tensor([e["mix"].shape[-1] for e in kept], dtype=torch.long)
    num_spks = {e["sources"].shape[0] for e in kept}
    if len(num_spks) != 1:
        raise ValueError(f"examples in one batch have different numbers of sources: {sorted(num_spks)}")
    T = int(lengths.max())
    mix = torch.zeros(len(kept), T)
    sources = torch.zeros(len(kept), num_spks.pop(), T)
    for i, e in enumerate(kept):
        n = e["mix"].shape[-1]
        mix[i, :n] = e["mix"]
        sources[i, :, :n] = e["sources"]
    return {"mix": mix, "sources": sources, "lengths": lengths, "ids": [e["id"] for e in kept], "skipped": skipped}

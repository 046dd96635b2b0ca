"""Output level of a model trained with a scale-invariant loss.

SI-SDR ignores the scale of an estimate, so a trained network may put out every speaker at any level (the
built-in model came out about 17 dB louder than the sources). The decoder is linear and has no bias, so one gain
folded into its weight brings the outputs to the level of the sources and leaves every SI-SDR unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from mossformer2.losses import pit_si_sdr_loss, reorder_estimates
from mossformer2.models import MossFormer2


@torch.no_grad()
def estimate_output_gain(model: MossFormer2, examples: Iterable[dict]) -> float:
    """The gain that puts ``model``'s outputs at the level of the references.

    ``examples`` yields ``{"mix": [T], "sources": [S, T]}`` (a dataset's items). For each speaker of each
    example the least-squares gain of its estimate (at the PIT permutation) onto its reference is
    ``|<est, ref>| / <est, est>``; the median over all of them is returned. The absolute value: the sign of an
    estimate is as free as its scale under SI-SDR and is not one number for all outputs.
    """
    device = next(model.parameters()).device
    model.eval()
    gains: list[float] = []
    for example in examples:
        mix = example["mix"].to(device)[None]
        ref = example["sources"].to(device)[None]
        est = model(mix).float()
        _, perm = pit_si_sdr_loss(est, ref)
        est = reorder_estimates(est, perm)[0]
        energy = (est * est).sum(-1)
        usable = energy > 0
        gains += ((est * ref[0]).sum(-1).abs() / energy.clamp_min(1e-12))[usable].tolist()
    if not gains:
        raise ValueError("no example gave a non-silent estimate: cannot estimate the output gain")
    return float(np.median(gains))


@torch.no_grad()
def fold_output_gain(model: MossFormer2, gain: float) -> None:
    """Scale every output of ``model`` by ``gain`` (in place, through the bias-free linear decoder)."""
    if not (gain > 0 and np.isfinite(gain)):
        raise ValueError(f"the output gain must be a positive finite number, got {gain}")
    if model.dec.bias is not None:
        raise ValueError("the decoder has a bias: a gain on its weight would not scale the outputs")
    model.dec.weight.mul_(gain)

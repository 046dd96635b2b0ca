"""Inference-time refinements of a model's separated sources: the polarity ensemble and mixture consistency.

Both work on any separation model (ours, the official one, an ONNX or TorchScript export) and are opt-in per
``Separator``; a checkpoint may recommend them (``"separation"`` entry, see ``Separator``). ``model_fn`` is a
callable ``([B, L], lengths [B] | None) -> [B, S, L]`` on CPU float32 tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mossformer2.separation.stitching import match_sources

ModelFnWithLengths = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def polarity_ensemble(model_fn: ModelFnWithLengths, batch: torch.Tensor,
                      lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the sources the model finds in ``x`` and (negated back) in ``-x``: ``[B, L] -> [B, S, L]``.

    MossFormer2's encoder is a convolution followed by a ReLU, so ``-x`` shows the network the other half-wave of
    every filter response: a second, different view of the same mixture, and the two estimates form a
    two-member ensemble at twice the cost. Both halves run as one batch of ``2B``. Each item's second estimate is
    put in the first's speaker order and polarity (over its true length) before averaging.
    """
    size = batch.shape[0]
    both = model_fn(torch.cat([batch, -batch]), None if lengths is None else torch.cat([lengths, lengths]))
    direct, flipped = both[:size], -both[size:]
    for b in range(size):
        n = batch.shape[-1] if lengths is None else int(lengths[b])
        order, signs = match_sources(flipped[b, :, :n].numpy(), direct[b, :, :n].numpy())
        flipped[b] = flipped[b, torch.from_numpy(order)] * torch.from_numpy(signs)[:, None]
    return (direct + flipped) / 2


def mixture_consistency(sources: torch.Tensor, mixture: torch.Tensor,
                        lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Sources ``[B, S, L]`` that sum exactly to ``mixture`` ``[B, L]``: each gets an equal share of the residual.

    This is the unweighted projection of Wisdom et al. (2019, "Differentiable consistency constraints for improved
    deep speech enhancement"). An SI-SDR-trained model leaves each source's polarity free, so a source that
    correlates negatively with the mixture is negated first (the residual would otherwise hold twice that
    source). The sources must be at the level of the mixture's components (a calibrated model: our checkpoints
    carry an ``output_gain`` for this); on arbitrarily scaled outputs the residual is mostly level error.
    """
    if lengths is not None:
        valid = torch.arange(mixture.shape[-1])[None, :] < lengths[:, None]  # [B, L]
        sources = sources * valid[:, None, :]
        mixture = mixture * valid
    agreement = torch.einsum("bsl,bl->bs", sources.double(), mixture.double())
    sources = sources * torch.where(agreement >= 0, 1.0, -1.0).to(sources.dtype)[..., None]
    residual = mixture - sources.sum(1)
    return sources + residual[:, None, :] / sources.shape[1]

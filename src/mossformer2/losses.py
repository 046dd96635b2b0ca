"""Scale-invariant SDR and permutation-invariant training (PIT) losses.

Shapes: ``est`` and ``ref`` are ``[B, S, T]``; ``lengths`` (optional) is ``[B]`` valid samples per example,
so padded batches of variable-length utterances are scored on their real samples only.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

EPS = 1e-8


def _length_mask(lengths: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor | None:
    """``[B, T]`` valid samples of each item; ValueError for ``lengths`` that are not one length in 0..T per item
    (negative or too long ones were taken; other shapes gave raw einsum or attribute errors)."""
    if lengths is None:
        return None
    if (not isinstance(lengths, torch.Tensor) or lengths.shape != (B,) or lengths.is_floating_point()
            or lengths.dtype == torch.bool):
        shown = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"lengths must be an integer tensor [{B}] (one length per item), got {shown}")
    if lengths.device.type == "cpu" and not bool(((lengths >= 0) & (lengths <= T)).all()):  # (no GPU sync)
        raise ValueError(f"lengths must lie in 0..{T} samples, got {lengths.tolist()}")
    return (torch.arange(T, device=device)[None, :] < lengths.to(device)[:, None])  # [B, T]


def _check_tensors(est: object, ref: object) -> None:
    if not (isinstance(est, torch.Tensor) and isinstance(ref, torch.Tensor)):
        raise TypeError(f"the losses take torch tensors (they return differentiable tensors), got "
                        f"{type(est).__name__} and {type(ref).__name__}: for NumPy arrays use "
                        "mossformer2.metrics.si_sdr, or convert with torch.from_numpy")


def pairwise_si_sdr(est: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor | None = None,
                    eps: float = EPS) -> torch.Tensor:
    """SI-SDR in dB of every estimate against every reference: ``[B, S_est, S_ref]``.

    Zero-mean over the valid samples; ``10 log10(|target|^2 / (|noise|^2 + eps) + eps)`` (the official recipe's
    and SpeechBrain's form), eps-safe in the projection and the ratio: silent targets or estimates give finite
    values and gradients, and a silent estimate scores -80 dB (eps in the numerator as well gave it 0 dB, above
    any poor estimate).
    """
    _check_tensors(est, ref)
    if est.shape[0] != ref.shape[0] or est.shape[-1] != ref.shape[-1]:
        raise ValueError(f"estimate {tuple(est.shape)} and reference {tuple(ref.shape)} shapes differ")
    mask = _length_mask(lengths, est.shape[0], est.shape[-1], est.device)
    if mask is not None:
        m = mask[:, None, :].to(est.dtype)
        n = m.sum(-1, keepdim=True).clamp_min(1.0)
        est = (est - (est * m).sum(-1, keepdim=True) / n) * m
        ref = (ref - (ref * m).sum(-1, keepdim=True) / n) * m
    else:
        est = est - est.mean(-1, keepdim=True)
        ref = ref - ref.mean(-1, keepdim=True)
    dot = torch.einsum("bit,bjt->bij", est, ref)  # [B, S_est, S_ref]
    ref_energy = (ref**2).sum(-1)[:, None, :]  # [B, 1, S_ref]
    scale = dot / (ref_energy + eps)
    target = scale[..., None] * ref[:, None, :, :]  # [B, S_est, S_ref, T]
    noise = est[:, :, None, :] - target
    target_energy = (target**2).sum(-1)
    noise_energy = (noise**2).sum(-1)
    return 10 * torch.log10(target_energy / (noise_energy + eps) + eps)


def si_sdr(est: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor | None = None,
           eps: float = EPS) -> torch.Tensor:
    """SI-SDR in dB of matching pairs. ``est``, ``ref``: ``[..., T]`` -> ``[...]``."""
    _check_tensors(est, ref)
    shape = est.shape[:-1]
    e = est.reshape(-1, 1, est.shape[-1])
    r = ref.reshape(-1, 1, ref.shape[-1])
    if lengths is not None:  # [B] for [B, ..., T] (one length for a [T] pair)
        lengths = lengths.reshape(shape[:1] + (1,) * (len(shape) - 1)).expand(shape).reshape(-1)
    return pairwise_si_sdr(e, r, lengths, eps)[:, 0, 0].reshape(shape)


def best_permutation(score: torch.Tensor) -> torch.Tensor:
    """Permutation maximising the summed ``score[b, i, perm[i]]`` per example.

    ``score``: ``[B, S, S]`` (estimate i vs reference j). Returns ``perm`` ``[B, S]`` such that estimate i goes to
    reference ``perm[b, i]``. Exhaustive search up to 3 speakers, Hungarian algorithm (scipy) above.
    """
    B, S, _ = score.shape
    score = score.detach()
    if S <= 3:
        perms = torch.tensor(list(itertools.permutations(range(S))), device=score.device)  # [P, S]
        idx = torch.arange(S, device=score.device)
        totals = score[:, idx[None, :], perms].sum(-1)  # [B, P]
        return perms[totals.argmax(-1)]
    out = np.empty((B, S), dtype=np.int64)
    # scipy refuses NaN/inf; any order then gives the NaN loss that the trainer skips, as the search above does.
    values = np.nan_to_num(score.float().cpu().numpy(), nan=-1e30, posinf=1e30, neginf=-1e30)
    for b in range(B):
        rows, cols = linear_sum_assignment(values[b], maximize=True)
        out[b, rows] = cols
    return torch.from_numpy(out).to(score.device)


def reorder_estimates(est: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Put estimates in reference order: output speaker ``perm[b, i]`` receives estimate i."""
    inverse = torch.argsort(perm, dim=-1)
    return torch.gather(est, 1, inverse[:, :, None].expand_as(est))


def pit_si_sdr_loss(est: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor | None = None,
                    clamp_db: float | None = None, reduction: str = "mean"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative SI-SDR under the best speaker permutation.

    Returns ``(loss, perm)``: ``loss`` is a scalar (``reduction='mean'``) or ``[B]`` (``'none'``), the negative
    mean SI-SDR over speakers; ``perm`` ``[B, S]`` maps estimate i to reference ``perm[b, i]``. ``clamp_db``
    caps each pair's SI-SDR (e.g. 30 dB) so that well-separated examples stop dominating the gradient.
    """
    _check_tensors(est, ref)
    if est.dim() != 3 or est.shape != ref.shape:
        raise ValueError(f"expected est and ref of equal shape [B, S, T]; got {tuple(est.shape)} "
                         f"and {tuple(ref.shape)}")
    pair = pairwise_si_sdr(est, ref, lengths)
    if clamp_db is not None:
        pair = pair.clamp(max=clamp_db)
    perm = best_permutation(pair)
    batch = torch.arange(est.shape[0], device=est.device)[:, None]
    speaker = torch.arange(est.shape[1], device=est.device)[None, :]
    chosen = pair[batch, speaker, perm]  # [B, S]: estimate i against reference perm[b, i]
    loss = -chosen.mean(-1)
    if reduction == "mean":
        loss = loss.mean()
    elif reduction != "none":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return loss, perm

"""Normalisation layers of MossFormer2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ScaleNorm(nn.Module):
    """``g * x / max(||x||_2 / sqrt(d), eps)`` over the last dim, one learnable scalar ``g``.

    x: ``[..., d]`` -> ``[..., d]``.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Half-precision input is normalised in float32 (as autocast runs norms): in float16, 1 / eps = 1e5
        # overflows, and a quiet frame's factor became inf (then NaN), as in a model cast with .half().
        full = _float32_statistics(x)
        norm = torch.linalg.vector_norm(full, dim=-1, keepdim=True) * self.scale
        # One pass over x: the per-frame factor g / norm is formed on the small [..., 1] tensor first.
        return (full * (self.g.to(full.dtype) / norm.clamp(min=self.eps))).to(x.dtype)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel dim of a channels-first tensor. x: ``[B, C, T]`` -> ``[B, C, T]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_channels_last(x.transpose(1, 2)).transpose(1, 2)

    def forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """The same normalisation on a channels-last tensor. x: ``[B, T, C]`` -> ``[B, T, C]``."""
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)



def _centred_and_variance(x: torch.Tensor, dims: list[int],
                          mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x - mean, var)`` with mean and (biased) variance over ``dims``, counting only elements where the
    broadcast ``mask`` is 1. Two passes (mean, then centred mean square): numerically stable."""
    if mask is None:
        mean = x.mean(dim=dims, keepdim=True)
        centred = x - mean
        return centred, centred.square().mean(dim=dims, keepdim=True)
    mask = mask.to(x.dtype)
    count = mask.expand_as(x).sum(dim=dims, keepdim=True)  # valid elements per normalised group
    mean = (x * mask).sum(dim=dims, keepdim=True) / count
    centred = x - mean
    return centred, (centred.square() * mask).sum(dim=dims, keepdim=True) / count


def _float32_statistics(x: torch.Tensor) -> torch.Tensor:
    """Half-precision input is normalised in float32, as autocast runs GroupNorm / LayerNorm."""
    return x.float() if x.dtype == torch.float16 or x.dtype == torch.bfloat16 else x


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with one group that can restrict its statistics to valid frames (same parameters and keys).

    x: ``[B, C, F]``, mask ``[B, 1, F]`` (1 = valid frame) or None -> ``[B, C, F]``. With a mask, valid frames equal
    ``F.group_norm(x[b:b+1, :, :n_b], 1, ...)``; padded frames hold values that later layers mask out.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # CUDA's group_norm reduces each (item, group) row in one thread block: with one group that is a single
        # block for the whole [C, F] activation (1.8 ms per call on an H100 at 4 s of audio, measured). The
        # moments below reduce over the whole device in ~1/50 of that.
        if mask is None and not x.is_cuda:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return self.normalize_by_moments(x, mask)

    def normalize_by_moments(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The one-group normalisation from explicit moments (over the valid frames only, given ``mask``)."""
        centred, var = _centred_and_variance(_float32_statistics(x), [1, 2], mask)
        return (centred * torch.rsqrt(var + self.eps) * self.weight.view(1, -1, 1)
                + self.bias.view(1, -1, 1)).to(x.dtype)


def instance_norm_over_time(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """InstanceNorm of a channels-last ``[B, F, C]`` tensor: per item and channel, statistics over time (the valid
    frames only with ``mask`` ``[B, F, 1]``, 1 = valid). Same result as ``F.instance_norm`` on ``[B, C, F]``.

    Computed as mean, centred values, then the mean square of those (two passes, numerically stable): on CPU this
    is several times faster than ``F.instance_norm`` / ``var_mean`` on the channels-last layout.
    """
    centred, var = _centred_and_variance(_float32_statistics(x), [1], mask)
    return (centred * (torch.rsqrt(var + eps) * weight) + bias).to(x.dtype)

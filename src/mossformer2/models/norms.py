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
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) * self.scale
        # One pass over x: the per-frame factor g / norm is formed on the small [..., 1] tensor first.
        return x * (self.g / norm.clamp(min=self.eps))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel dim of a channels-first tensor. x: ``[B, C, T]`` -> ``[B, C, T]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_channels_last(x.transpose(1, 2)).transpose(1, 2)

    def forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """The same normalisation on a channels-last tensor. x: ``[B, T, C]`` -> ``[B, T, C]``."""
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)



def masked_group_norm(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      eps: float) -> torch.Tensor:
    """GroupNorm with one group, statistics over the valid frames only.

    x: ``[B, C, F]``, mask ``[B, 1, F]`` (1 = valid frame, 0 = padding) -> ``[B, C, F]``. Valid frames equal
    ``F.group_norm(x[b:b+1, :, :n_b], 1, ...)``; padded frames hold values that later layers mask out.
    """
    dtype = x.dtype
    if dtype == torch.float16 or dtype == torch.bfloat16:  # statistics in float32, as GroupNorm under autocast
        x = x.float()
    mask = mask.to(x.dtype)
    count = mask.sum(dim=(1, 2), keepdim=True) * x.shape[1]
    mean = (x * mask).sum(dim=(1, 2), keepdim=True) / count
    centred = x - mean
    var = (centred.square() * mask).sum(dim=(1, 2), keepdim=True) / count
    return (centred * torch.rsqrt(var + eps) * weight.view(1, -1, 1) + bias.view(1, -1, 1)).to(dtype)


def instance_norm_over_time(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """InstanceNorm of a channels-last ``[B, F, C]`` tensor: per item and channel, statistics over time (the valid
    frames only with ``mask`` ``[B, F, 1]``, 1 = valid). Same result as ``F.instance_norm`` on ``[B, C, F]``.

    Computed as mean, centred values, then the mean square of those (two passes, numerically stable): on CPU this
    is several times faster than ``F.instance_norm`` / ``var_mean`` on the channels-last layout.
    """
    dtype = x.dtype
    if dtype == torch.float16 or dtype == torch.bfloat16:  # statistics in float32
        x = x.float()
    if mask is None:
        mean = x.mean(dim=1, keepdim=True)
        centred = x - mean
        var = centred.square().mean(dim=1, keepdim=True)
    else:
        mask = mask.to(x.dtype)
        count = mask.sum(dim=1, keepdim=True)
        mean = (x * mask).sum(dim=1, keepdim=True) / count
        centred = x - mean
        var = (centred.square() * mask).sum(dim=1, keepdim=True) / count
    return (centred * (torch.rsqrt(var + eps) * weight) + bias).to(dtype)

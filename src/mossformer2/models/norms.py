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
        return x / norm.clamp(min=self.eps) * self.g


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
    count = mask.sum(dim=(1, 2), keepdim=True) * x.shape[1]
    mean = (x * mask).sum(dim=(1, 2), keepdim=True) / count
    centred = x - mean
    var = (centred.square() * mask).sum(dim=(1, 2), keepdim=True) / count
    return centred * torch.rsqrt(var + eps) * weight.view(1, -1, 1) + bias.view(1, -1, 1)


def masked_instance_norm(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float) -> torch.Tensor:
    """InstanceNorm over the valid frames of the last axis. x: ``[B, C, 1, F]``, mask ``[B, 1, 1, F]`` ->
    ``[B, C, 1, F]``; valid frames equal ``F.instance_norm`` of each item cut to its valid frames."""
    count = mask.sum(dim=-1, keepdim=True)
    mean = (x * mask).sum(dim=-1, keepdim=True) / count
    centred = x - mean
    var = (centred.square() * mask).sum(dim=-1, keepdim=True) / count
    return centred * torch.rsqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)

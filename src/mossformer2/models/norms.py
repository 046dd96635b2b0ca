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

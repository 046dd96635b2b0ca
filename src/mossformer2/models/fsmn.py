"""Gated dilated FSMN block (Gated_FSMN_Block_Dilated) and its parts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mossformer2.models.convolution import FeedForwardConv, conv_along_time
from mossformer2.models.norms import ChannelLayerNorm, masked_instance_norm


class DilatedDenseNet(nn.Module):
    """Two dense stages of depth-wise dilated convolutions along time (kernel ``2*lorder-1``, non-causal).

    x: ``[B, F, C]`` -> ``[B, F, C]``. Stage 2 convolves ``concat(o1, x)`` with ``groups=C``, so output channel
    j reads concat channels 2j and 2j+1 (the official layout, kept for checkpoint compatibility). Weights keep the
    official Conv2d shapes ``[C, k, 39, 1]``; the computation runs on the ``[B, C, 1, F]`` view of x, which is
    channels-last in memory, so oneDNN convolves without a layout copy (much faster than Conv1d on a transpose).
    InstanceNorm uses per-example statistics over time, also in eval. With ``mask`` ``[B, F, 1]`` (1 = valid),
    conv inputs are zeroed on padded frames and the statistics cover the valid frames only.
    """

    depth = 2

    def __init__(self, channels: int, lorder: int = 20) -> None:
        super().__init__()
        self.channels = channels
        kernel = (2 * lorder - 1, 1)
        self.paddings = [lorder + (2**i - 1) * (lorder - 1) - 1 for i in range(self.depth)]
        self.conv1 = nn.Conv2d(channels, channels, kernel, dilation=(1, 1), groups=channels, bias=False)
        self.norm1 = nn.InstanceNorm2d(channels, affine=True)
        self.prelu1 = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(2 * channels, channels, kernel, dilation=(2, 1), groups=channels, bias=False)
        self.norm2 = nn.InstanceNorm2d(channels, affine=True)
        self.prelu2 = nn.PReLU(channels)
        self.norm_eps = float(self.norm1.eps)  # a plain attribute: TorchScript cannot read InstanceNorm's eps

    def _stage(self, x: torch.Tensor, conv_weight: torch.Tensor, norm_weight: torch.Tensor,
               norm_bias: torch.Tensor, prelu_weight: torch.Tensor, padding: int, dilation: int,
               mask: torch.Tensor | None) -> torch.Tensor:
        """x: ``[B, C_in, 1, F]`` -> ``[B, C, 1, F]``; the ``[C, k, K, 1]`` kernel runs along the last axis.

        mask: ``[B, 1, 1, F]`` or None; x must already be zero on padded frames."""
        out = conv_along_time(x, conv_weight.transpose(2, 3), padding, dilation, self.channels)
        if mask is None:
            out = F.instance_norm(out, weight=norm_weight, bias=norm_bias, eps=self.norm_eps)
        else:
            out = masked_instance_norm(out, mask, norm_weight, norm_bias, self.norm_eps)
        return F.prelu(out, prelu_weight)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        time_mask: torch.Tensor | None = None
        if mask is not None:
            x = x * mask
            time_mask = mask.transpose(1, 2).unsqueeze(2)  # [B, 1, 1, F]
        x = x.transpose(1, 2).unsqueeze(2)  # [B, C, 1, F]: a channels-last view of the same memory
        o1 = self._stage(x, self.conv1.weight, self.norm1.weight, self.norm1.bias, self.prelu1.weight,
                         self.paddings[0], 1, time_mask)
        if time_mask is not None:
            o1 = o1 * time_mask
        # Stage 2 (two input channels per group) is fast in oneDNN's plain layout, which this concat yields;
        # in channels-last that grouped conv takes a slow path.
        o2 = self._stage(torch.cat((o1, x), dim=1), self.conv2.weight, self.norm2.weight, self.norm2.bias,
                         self.prelu2.weight, self.paddings[1], 2, time_mask)
        return o2.squeeze(2).transpose(1, 2)


class DilatedFSMN(nn.Module):
    """UniDeepFsmn_dilated: ``x + DilatedDenseNet(project(ReLU(linear(x))))``. x: ``[B, F, C]`` -> ``[B, F, C]``."""

    def __init__(self, channels: int, lorder: int = 20) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, channels)
        self.project = nn.Linear(channels, channels, bias=False)
        self.conv = DilatedDenseNet(channels, lorder)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.conv(self.project(F.relu(self.linear(x))), mask)


class GatedFSMN(nn.Module):
    """Gated_FSMN_dilated: ``to_v(x) * fsmn(to_u(x)) + x``. x: ``[B, F, C]`` -> ``[B, F, C]``."""

    def __init__(self, channels: int, lorder: int = 20, conv_kernel_size: int = 17, dropout: float = 0.1) -> None:
        super().__init__()
        self.to_u = FeedForwardConv(channels, channels, nn.LayerNorm(channels), conv_kernel_size, dropout)
        self.to_v = FeedForwardConv(channels, channels, nn.LayerNorm(channels), conv_kernel_size, dropout)
        self.fsmn = DilatedFSMN(channels, lorder)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.to_v(x, mask) * self.fsmn(self.to_u(x, mask), mask) + x


class GatedFSMNBlock(nn.Module):
    """Bottleneck around the gated FSMN: 1x1 conv D->I, PReLU, LN, gated FSMN, LN, 1x1 conv I->D, residual.

    x: ``[B, F, D]`` -> ``[B, F, D]``; ``mask`` ``[B, F, 1]`` (1 = valid frame) for zero-padded batches.
    """

    def __init__(self, dim: int, inner_dim: int = 256, lorder: int = 20, conv_kernel_size: int = 17,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(dim, inner_dim, 1), nn.PReLU())
        self.norm1 = ChannelLayerNorm(inner_dim)
        self.gated_fsmn = GatedFSMN(inner_dim, lorder, conv_kernel_size, dropout)
        self.norm2 = ChannelLayerNorm(inner_dim)
        self.conv2 = nn.Conv1d(inner_dim, dim, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # The 1x1 convs and channel norms run as Linear / LayerNorm on [B, F, C] (same math, no transposes).
        h = self.conv1[1](F.linear(x, self.conv1[0].weight.squeeze(-1), self.conv1[0].bias))  # [B, F, I]
        h = self.gated_fsmn(self.norm1.forward_channels_last(h), mask)
        h = self.norm2.forward_channels_last(h)
        return F.linear(h, self.conv2.weight.squeeze(-1), self.conv2.bias) + x

"""Gated dilated FSMN block (Gated_FSMN_Block_Dilated) and its parts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mossformer2.models.convolution import FeedForwardConv, conv_along_time
from mossformer2.models.norms import ChannelLayerNorm, instance_norm_over_time


class DilatedDenseNet(nn.Module):
    """Two dense stages of depth-wise dilated convolutions along time (kernel ``2*lorder-1``, non-causal).

    x: ``[B, F, C]`` -> ``[B, F, C]``. Stage 2 convolves ``concat(o1, x)`` with ``groups=C``, so output channel
    j reads concat channels 2j and 2j+1 (the official layout, kept for checkpoint compatibility). Weights keep the
    official Conv2d shapes ``[C, k, 39, 1]``; everything runs on ``[B, F, C]`` tensors, whose ``[B, C, 1, F]`` view
    is channels-last in memory, so oneDNN convolves without layout copies. InstanceNorm uses per-example statistics
    over time, also in eval. With ``mask`` ``[B, F, 1]`` (1 = valid), conv inputs are zeroed on padded frames and
    the statistics cover the valid frames only.
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
        self.cuda_depthwise_layout = ""  # "" = convolution.CUDA_DEPTHWISE_LAYOUT

    def depthwise_weights(self) -> tuple[torch.Tensor, ...]:
        """As ``ConvModule.depthwise_weights``, for both stages (stage 2 runs as two depth-wise convs of its
        ``[2C, 1, 1, K]`` view, which stays a view with the taps outermost)."""
        return (self.conv1.weight, self.conv2.weight)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, padding: int, dilation: int) -> torch.Tensor:
        """``[B, F, C_in]`` conv with a ``[C, k, 1, K]`` kernel (``groups=C``) along time -> ``[B, F, C]``."""
        out = conv_along_time(x.transpose(1, 2).unsqueeze(2), weight, padding, dilation, self.channels,
                              self.cuda_depthwise_layout)
        return out.squeeze(2).transpose(1, 2)

    def _norm_prelu(self, x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                    prelu_weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = instance_norm_over_time(x, norm_weight, norm_bias, self.norm_eps, mask)
        return F.prelu(x.transpose(1, 2), prelu_weight).transpose(1, 2)  # PReLU's channel axis is dim 1

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            x = x * mask
        C = self.channels
        # [C, 1, K, 1] -> [C, 1, 1, K] as a view of the weight: the gradient then comes back with the parameter's
        # own strides (a transpose gave it others, and DDP warned on every rank).
        o1 = self._conv(x, self.conv1.weight.flatten(2).unsqueeze(2), self.paddings[0], 1)
        o1 = self._norm_prelu(o1, self.norm1.weight, self.norm1.bias, self.prelu1.weight, mask)
        if mask is not None:
            o1 = o1 * mask
        if C % 2 == 0:
            # Output j reads concat channels 2j and 2j+1, so outputs [0, C/2) read only o1 and [C/2, C) only x.
            # Each half is a depth-wise conv (kernel w[j, i] on input channel 2j+i) plus a sum of adjacent
            # channel pairs: far faster than oneDNN's two-inputs-per-group conv on a concatenated copy.
            per_input = self.conv2.weight.reshape(2 * C, 1, 1, -1)  # [2C, 1, 1, K]
            y1 = self._conv(o1, per_input[:C], self.paddings[1], 2)
            y2 = self._conv(x, per_input[C:], self.paddings[1], 2)
            o2 = torch.cat((y1[..., 0::2] + y1[..., 1::2], y2[..., 0::2] + y2[..., 1::2]), dim=-1)
        else:
            o2 = self._conv(torch.cat((o1, x), dim=-1), self.conv2.weight.flatten(2).unsqueeze(2), self.paddings[1], 2)
        return self._norm_prelu(o2, self.norm2.weight, self.norm2.bias, self.prelu2.weight, mask)


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

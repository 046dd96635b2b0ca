"""MossFormer2 separation network: encoder, mask net (single-path MossFormer + gated FSMN), decoder.

Module names follow the official MossFormer2_SS_16K inner model so that ``state_dict()`` keys equal the released
checkpoint's (``enc.*``, ``mask_net.*``, ``dec.*``).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mossformer2.models.config import MossFormer2Config
from mossformer2.models.embeddings import RotaryEmbedding, ScaledSinusoidalEmbedding
from mossformer2.models.flash import FLASHLayer
from mossformer2.models.fsmn import GatedFSMNBlock


class Encoder(nn.Module):
    """Strided Conv1d (no bias) + ReLU. wave ``[B, T]`` -> ``[B, E, F]``, F = (T - K) // (K/2) + 1."""

    def __init__(self, kernel_size: int, out_channels: int) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(1, out_channels, kernel_size, stride=kernel_size // 2, bias=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv1d(wave.unsqueeze(1)))


class MossFormerLayers(nn.Module):
    """L pairs of (FLASH layer, gated FSMN block) sharing one rotary embedding. x: ``[B, F, D]``.

    ``fsmn`` is registered before ``layers`` to keep the official state-dict order.
    """

    def __init__(self, config: MossFormer2Config) -> None:
        super().__init__()
        c = config
        D = c.mossformer_sequence_dim
        rotary = RotaryEmbedding(c.rotary_dim)
        self.fsmn = nn.ModuleList(
            GatedFSMNBlock(D, c.fsmn_inner_dim, c.fsmn_lorder, c.conv_kernel_size, c.dropout)
            for _ in range(c.num_mossformer_layer)
        )
        self.layers = nn.ModuleList(
            FLASHLayer(D, rotary, c.group_size, c.query_key_dim, c.expansion_factor, c.dropout,
                       c.conv_kernel_size)
            for _ in range(c.num_mossformer_layer)
        )
        # Recompute each layer in the backward pass instead of storing activations (training only).
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return self._forward_checkpointed(x)
        for flash, fsmn in zip(self.layers, self.fsmn):
            x = fsmn(flash(x))
        return x

    @torch.jit.unused
    def _forward_checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        for flash, fsmn in zip(self.layers, self.fsmn):
            x = checkpoint(flash, x, use_reentrant=False)
            x = checkpoint(fsmn, x, use_reentrant=False)
        return x


class MossFormerModule(nn.Module):
    """The layer stack followed by LayerNorm(eps 1e-6). x: ``[B, F, D]`` -> ``[B, F, D]``."""

    def __init__(self, config: MossFormer2Config) -> None:
        super().__init__()
        self.mossformerM = MossFormerLayers(config)
        self.norm = nn.LayerNorm(config.mossformer_sequence_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.mossformerM(x))


class ComputationBlock(nn.Module):
    """Single-path block: MossFormer over time, GroupNorm, skip connection. x: ``[B, D, F]`` -> ``[B, D, F]``."""

    def __init__(self, config: MossFormer2Config) -> None:
        super().__init__()
        self.intra_mdl = MossFormerModule(config)
        self.intra_norm = nn.GroupNorm(1, config.mossformer_sequence_dim, eps=1e-8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        intra = self.intra_mdl(x.transpose(1, 2)).transpose(1, 2)
        return self.intra_norm(intra) + x


class MaskNet(nn.Module):
    """Estimates one non-negative mask per speaker. x: ``[B, E, F]`` -> masks ``[S, B, E, F]``."""

    def __init__(self, config: MossFormer2Config) -> None:
        super().__init__()
        E, D, S = config.encoder_embedding_dim, config.mossformer_sequence_dim, config.num_spks
        self.num_spks = S
        self.norm = nn.GroupNorm(1, E, eps=1e-8)
        self.conv1d_encoder = nn.Conv1d(E, D, 1, bias=False)
        self.pos_enc = ScaledSinusoidalEmbedding(D)
        self.mdl = ComputationBlock(config)
        self.conv1d_out = nn.Conv1d(D, D * S, 1)
        self.conv1_decoder = nn.Conv1d(D, E, 1, bias=False)
        self.prelu = nn.PReLU()
        self.output = nn.Sequential(nn.Conv1d(D, D, 1), nn.Tanh())
        self.output_gate = nn.Sequential(nn.Conv1d(D, D, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1d_encoder(self.norm(x))  # [B, D, F]
        x = x + self.pos_enc(x.shape[-1], x.device).transpose(0, 1).to(x.dtype)
        x = self.conv1d_out(self.prelu(self.mdl(x)))  # [B, S*D, F]
        B, _, n = x.shape
        x = x.reshape(B * self.num_spks, -1, n)  # speaker k takes channels k*D..(k+1)*D-1
        x = self.conv1_decoder(self.output(x) * self.output_gate(x))
        masks = F.relu(x.reshape(B, self.num_spks, -1, n))
        return masks.transpose(0, 1)


class MossFormer2(nn.Module):
    """MossFormer2 speech separation network (official MossFormer2_SS_16K layout).

    ``forward(wave)``: wave ``[B, T]`` float at ``config.sample_rate`` -> separated sources ``[B, S, T]``.
    """

    def __init__(self, config: MossFormer2Config | None = None) -> None:
        super().__init__()
        self.config = config or MossFormer2Config()
        c = self.config
        self.num_spks = c.num_spks
        self.kernel_size = c.encoder_kernel_size
        # Instance norm over time needs two or more encoder frames.
        self.min_input_length = c.encoder_kernel_size + c.hop_size
        self.enc = Encoder(c.encoder_kernel_size, c.encoder_embedding_dim)
        self.mask_net = MaskNet(c)
        self.dec = nn.ConvTranspose1d(c.mossformer_sequence_dim, 1, c.encoder_kernel_size,
                                      stride=c.encoder_kernel_size // 2, bias=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self.check_input(wave)
        T = wave.shape[-1]
        feats = self.enc(wave)  # [B, E, F]
        masks = self.mask_net(feats)  # [S, B, E, F]
        B, n = feats.shape[0], feats.shape[-1]
        separated = (feats.unsqueeze(0) * masks).reshape(self.num_spks * B, -1, n)
        out = self.dec(separated).reshape(self.num_spks, B, -1).transpose(0, 1)  # [B, S, T']
        # The decoder yields (F-1)*hop + K <= T samples: zero-pad to the input length (no branch: exportable).
        return F.pad(out, (0, T - out.shape[-1]))

    def check_input(self, wave: torch.Tensor) -> None:
        """Raise ValueError with a readable message for input the network cannot process."""
        if not isinstance(wave, torch.Tensor):
            raise ValueError(f"MossFormer2 expects a torch.Tensor waveform [batch, samples], got {type(wave)}")
        if wave.dim() != 2:
            raise ValueError(
                f"MossFormer2 expects a waveform of shape [batch, samples], got shape {tuple(wave.shape)}; "
                "use wave.unsqueeze(0) for a single signal"
            )
        if not wave.is_floating_point():
            raise ValueError(
                f"MossFormer2 expects floating-point samples in [-1, 1], got dtype {wave.dtype}; "
                "convert integer PCM first (e.g. int16 / 32768)"
            )
        if wave.shape[-1] < self.min_input_length:
            raise ValueError(
                f"input has {wave.shape[-1]} samples but the network needs at least {self.min_input_length} "
                f"(two encoder frames of kernel {self.kernel_size}); the signal is too short to separate"
            )
        if not bool(torch.isfinite(wave).all()):
            raise ValueError("input contains NaN or infinite samples")

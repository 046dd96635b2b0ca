"""Gated FLASH attention layer (FLASH_ShareA_FFConvM): local quadratic + global linear attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mossformer2.models.convolution import FeedForwardConv
from mossformer2.models.embeddings import RotaryEmbedding
from mossformer2.models.norms import ScaleNorm


class OffsetScale(nn.Module):
    """Per-head ``x * gamma_h + beta_h``. x: ``[B, F, d]`` -> ``[B, F, heads, d]``."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(heads, dim))
        self.beta = nn.Parameter(torch.zeros(heads, dim))
        nn.init.normal_(self.gamma, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-2) * self.gamma + self.beta


class FLASHLayer(nn.Module):
    """One FLASH layer with shared-A attention and FFConvM projections. x: ``[B, F, D]`` -> ``[B, F, D]``.

    Token shift delays the first half of the features by one frame before the projections. Attention is
    ReLU(q k^T / g)^2 inside non-overlapping groups of ``g`` frames plus a global linear attention divided by the
    true frame count. Gating pairs crosswise: ``out = att_u * v * sigmoid(att_v * u)``.

    ``mask`` ``[B, F, 1]`` (1 = valid frame) makes each item of a zero-padded batch see only its own frames.
    """

    def __init__(self, dim: int, rotary: RotaryEmbedding, group_size: int = 256, query_key_dim: int = 128,
                 expansion_factor: float = 4.0, dropout: float = 0.1, conv_kernel_size: int = 17) -> None:
        super().__init__()
        hidden = int(dim * expansion_factor)
        self.group_size = group_size
        self.rotary_pos_emb = rotary
        self.dropout = nn.Dropout(dropout)
        self.to_hidden = FeedForwardConv(dim, hidden, ScaleNorm(dim), conv_kernel_size, dropout)
        self.to_qk = FeedForwardConv(dim, query_key_dim, ScaleNorm(dim), conv_kernel_size, dropout)
        self.qk_offset_scale = OffsetScale(query_key_dim, heads=4)
        self.to_out = FeedForwardConv(hidden // 2, dim, ScaleNorm(hidden // 2), conv_kernel_size, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        half = x.shape[-1] // 2
        shifted = F.pad(x[..., :half], (0, 0, 1, -1))  # frame t takes frame t-1, frame 0 gets zeros
        shifted_x = torch.cat((shifted, x[..., half:]), dim=-1)
        vu = self.to_hidden(shifted_x, mask)  # [B, F, H] = concat(v, u), each [B, F, H/2]
        qk = self.qk_offset_scale(self.to_qk(shifted_x, mask))  # [B, F, 4, dk]: quad_q, lin_q, quad_k, lin_k
        att_v, att_u = self._attention(qk, vu, mask)
        # Slices rather than chunk(): chunk exports to an ONNX sequence op the exporter cannot fold.
        dv = vu.shape[-1] // 2
        v, u = vu[..., :dv], vu[..., dv:]
        out = (att_u * v) * torch.sigmoid(att_v * u)
        return x + self.to_out(out, mask)

    def _attention(self, qk: torch.Tensor, vu: torch.Tensor,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """qk: ``[B, F, 4, dk]`` (quad_q, lin_q, quad_k, lin_k); vu: ``[B, F, 2dv]`` -> (att_v, att_u) ``[B, F, dv]``.

        v and u are attended together as one ``2dv``-wide tensor (the projection output itself: no copy).
        With ``mask``, padded frames get zero values, so they add nothing to either attention, and the linear
        attention divides by each item's own frame count.
        """
        B, n = vu.shape[0], vu.shape[1]
        g = self.group_size
        cos, sin = self.rotary_pos_emb.cos_sin(n, vu.device, qk.dtype)
        qk = self.rotary_pos_emb.rotate(qk, cos.unsqueeze(1), sin.unsqueeze(1))  # all four heads at once

        # Local quadratic attention in groups of g frames; zero padding makes padded keys contribute nothing,
        # which is what the reference's key mask does (ReLU(0)^2 = 0 and padded values are zero). Padding
        # unconditionally keeps the graph free of shape-dependent branches (ONNX / torch.export, any length).
        padding = (g - n % g) % g
        groups = (n + padding) // g
        # Head-major copy [4, B, Fp, dk]: each head contiguous, so the matmuls below take their fast path
        # (on a strided head view the per-frame linear-attention matmul ran ~8x slower on CPU).
        heads = F.pad(qk, (0, 0, 0, 0, 0, padding)).permute(2, 0, 1, 3).contiguous()

        # Global linear attention over the unpadded sequence (padding frames would add zeros anyway): the mean over
        # frames of k v^T. In float16 the sum over frames passes 65504 (inf) on a long input (~40 s in one pass),
        # and dividing the keys first would push most of them below float16's normal range (6e-5): both factors
        # are scaled by 1/sqrt(frames) instead, so the sum stays the size of the mean. Other dtypes sum as the
        # reference does, then divide.
        lin_k = heads[3, :, :n].transpose(1, 2)  # [B, dk, F]
        if mask is None:
            if vu.dtype == torch.float16:
                lin_kvu = torch.matmul(lin_k * n ** -0.5, vu * n ** -0.5)  # [B, dk, 2dv]
            else:
                lin_kvu = torch.matmul(lin_k, vu) / n
        else:
            vu = vu * mask
            # Frames counted in float32: a bfloat16 mask (a model cast with .bfloat16()) counts 10,001 as 9,984,
            # and float16 cannot hold a count past 65504.
            frames = mask.sum(dim=1, keepdim=True, dtype=torch.float32)  # [B, 1, 1]
            if vu.dtype == torch.float16:
                scale = frames.rsqrt().to(vu.dtype)
                lin_kvu = torch.matmul(lin_k * scale, vu * scale)
            else:
                lin_kvu = torch.matmul(lin_k, vu)
                lin_kvu = (lin_kvu / frames).to(lin_kvu.dtype)

        quad_q = heads[0].reshape(B * groups, g, -1)
        quad_k = heads[2].reshape(B * groups, g, -1)
        attn = F.relu(torch.bmm(quad_q, quad_k.transpose(1, 2)) / g) ** 2  # [B*G, g, g]
        # CUDA autocast runs pow in float32, and the in-place matmul-adds below are not autocast: match vu.
        attn = self.dropout(attn).to(vu.dtype)
        # Linear part computed per frame (padded rows are dropped below), then the quadratic part is accumulated
        # into it in place by batched matmul-adds.
        lin_out = torch.matmul(heads[1], lin_kvu)  # [B, Fp, 2dv]
        # The unpadded variant saves a copy of the widest tensor on CPU (memory-bound there); on GPUs its per-item
        # loop would add kernel launches, and exporters need the branch-free graph.
        if (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling() or padding == 0
                or vu.device.type != "cpu"):
            vu = F.pad(vu, (0, 0, 0, padding))
            out = lin_out.reshape(B * groups, g, -1).baddbmm_(attn, vu.reshape(B * groups, g, -1))
        else:
            out = self._add_quadratic_unpadded(lin_out, attn, vu, n)
        out = out.reshape(B, groups * g, -1)[:, :n]
        dv = out.shape[-1] // 2
        return out[..., :dv], out[..., dv:]

    @torch.jit.unused
    def _add_quadratic_unpadded(self, lin_out: torch.Tensor, attn: torch.Tensor, vu: torch.Tensor,
                                n: int) -> torch.Tensor:
        """Eager twin of the padded path that never copies vu (``[B, n, 2dv]``, the widest tensor) into a
        padded buffer: full groups are views of it, the last partial group multiplies its ``r x r`` corner.
        lin_out ``[B, Fp, 2dv]`` (updated in place), attn ``[B*G, g, g]`` -> lin_out."""
        B, g = vu.shape[0], self.group_size
        groups = lin_out.shape[1] // g
        full, rest = n // g, n % g
        attn = attn.view(B, groups, g, g)
        for b in range(B):
            if full > 0:
                lin_out[b, : full * g].view(full, g, -1).baddbmm_(attn[b, :full],
                                                                     vu[b, : full * g].view(full, g, -1))
            lin_out[b, full * g : n].addmm_(attn[b, full, :rest, :rest], vu[b, full * g :])
        return lin_out

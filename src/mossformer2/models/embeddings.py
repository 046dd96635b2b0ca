"""Position encodings computed in our own code (no einops / rotary-embedding-torch; ONNX-exportable)."""

from __future__ import annotations

import torch
from torch import nn


def sinusoidal_inv_freq(dim: int, device: torch.device | None = None) -> torch.Tensor:
    """``10000^(-2j/dim)`` for j = 0..dim/2-1 (float32)."""
    return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def full_precision_frequencies(stored: torch.Tensor, dim: int) -> torch.Tensor:
    """The formula's values of the closed-form frequency table ``stored`` of ``dim``, whatever it holds: float32
    (float64 for a float64 module; the official checkpoint's tables are these float32 values bit for bit). A module
    cast to half precision (``model.bfloat16()``) rounds its tables, and a cast back to float32 (``.float()``, a
    save and reload, an export) keeps the rounding: bfloat16 keeps 8 bits, and a 2^-9 error in a frequency moves
    frame 8000's angle by up to 15 rad, which scrambles the positions (full network, random weights, 4 s: bf16
    weights gave 3.8 dB SI-SDR from its fp32 output with rounded tables, 35.8 dB with exact ones; reloaded as
    float32, 5.2 dB against 44.2 dB)."""
    exact = sinusoidal_inv_freq(dim, stored.device)
    return exact.double() if stored.dtype == torch.float64 else exact


class ScaledSinusoidalEmbedding(nn.Module):
    """Absolute position table ``scale * concat(sin(t f), cos(t f))`` (halves concatenated, not interleaved).

    Returns ``[F, dim]`` for a sequence of ``num_frames``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("inv_freq", sinusoidal_inv_freq(dim))

    def forward(self, num_frames: int, device: torch.device) -> torch.Tensor:
        # Positions and angles in float32 (or float64) whatever the module's dtype: in bfloat16, frame 8000 would be
        # rounded to a multiple of 32.
        inv_freq = full_precision_frequencies(self.inv_freq, 2 * self.inv_freq.shape[0])
        t = torch.arange(num_frames, device=device).to(inv_freq.dtype)
        angles = t[:, None] * inv_freq[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1) * self.scale


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on the first ``dim`` features, interleaved pairs (2i, 2i+1).

    Matches rotary-embedding-torch 0.8.3: angle = float32(pos) * freq_i, freq_i = 10000^(-2i/dim).
    One instance is shared by all FLASH layers (hence the aliased ``freqs`` entries in the state dict). The stored
    ``freqs`` are kept for the checkpoints' keys; the angles always use the formula's float32 values (see
    :func:`full_precision_frequencies`).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.freqs = nn.Parameter(sinusoidal_inv_freq(dim), requires_grad=False)

    def cos_sin(self, num_frames: int, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables ``[F, dim]`` in ``dtype``, each angle repeated for its pair.

        Angles are float32 products, as in the reference library (which caches them in float32); their cos / sin
        are taken in float32 or ``dtype``, whichever is wider, and only the tables are cast. Casting the angles to
        half precision first would quantise them (bfloat16 keeps 8 bits: frame 8000's angle to a multiple of
        32 rad) and scramble the positions.
        """
        t = torch.arange(num_frames, device=device, dtype=torch.float32)
        angles = t[:, None] * sinusoidal_inv_freq(self.dim, self.freqs.device)[None, :]  # [F, dim/2]
        # Each angle twice, by expand + flatten: repeat_interleave may wait for the device (no CUDA graphs then).
        angles = angles.unsqueeze(-1).expand(-1, -1, 2).flatten(-2)  # [F, dim]
        angles = angles.to(torch.promote_types(dtype, torch.float32))
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: ``[B, F, ..., d]`` (d >= dim; the model passes ``[B, F, 4, dk]``), cos / sin broadcastable to its
        first ``dim`` features (``[F, 1, dim]`` there) -> rotated copy; features beyond ``dim`` pass through."""
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        pairs = rot.unflatten(-1, (-1, 2))
        rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        rot = rot * cos + rotated_half * sin
        return torch.cat((rot, rest), dim=-1)

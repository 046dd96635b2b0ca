"""Convolutional feed-forward pieces: the depth-wise ConvModule and FFConvM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# How depth-wise convs along time lay out their input on CUDA (measurements: benchmarks/RESULTS.md):
# - "contiguous" (default): copy the [B, T, C] activation to [B, C, 1, T] for PyTorch's depth-wise kernel (faster
#   end to end than "channels_last" on an H200);
# - "channels_last": convolve the [B, C, 1, T] view in place (cuDNN's NHWC grouped kernels);
# - "shifted_sum*" (depthwise_shifted_sum), for torch.compile, which turns K shifted, scaled slices of the
#   [B, T, C] input into one elementwise kernel (no layout copies, no conv kernel); eager, K passes. How the padded
#   input reaches the taps (SHIFTED_SUM_INPUTS): "shifted_sum" lets the compiler fuse its producer into every read
#   (wrong float32 output on an H200: kept for measurements only), "shifted_sum_stored" stores it once
#   (pad_frames; MossFormer2.compile_layers' default), "shifted_sum_realized" has the producer write the padded
#   buffer itself (realize_for_compiler; no copy, not yet measured on a GPU).
# Modules may override the global with their own ``cuda_depthwise_layout`` (MossFormer2.set_cuda_depthwise_layout,
# which also lays their depthwise_weights() out for the chosen form: store_taps_outermost).
CUDA_DEPTHWISE_LAYOUTS = ("contiguous", "channels_last", "shifted_sum", "shifted_sum_stored", "shifted_sum_realized")
# How depthwise_shifted_sum's padded input reaches the taps, for each shifted-sum layout.
SHIFTED_SUM_INPUTS = {"shifted_sum": "fused", "shifted_sum_stored": "stored", "shifted_sum_realized": "realized"}
CUDA_DEPTHWISE_LAYOUT = "contiguous"


@torch.library.custom_op("mossformer2::pad_frames", mutates_args=())
def pad_frames(x: torch.Tensor, padding: int) -> torch.Tensor:
    """``[B, T, C]`` -> ``[B, T + 2 * padding, C]`` (contiguous), zeros at both ends of the time axis.

    An operator of its own: torch.compile cannot fuse it with its producer, so a value read once per conv tap is
    computed and stored once instead of being recomputed inside every read. Only the padding is zeroed (F.pad
    fills the whole output first: an extra pass over it, 7 of 458 ms in an H200 profile at batch 16).
    """
    frames = x.shape[1]
    out = x.new_empty((x.shape[0], frames + 2 * padding, x.shape[2]))
    out[:, :padding].zero_()
    out[:, padding + frames:].zero_()
    out[:, padding:padding + frames].copy_(x)
    return out


@pad_frames.register_fake
def _pad_frames_fake(x: torch.Tensor, padding: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1] + 2 * padding, x.shape[2]))


def _pad_frames_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    return grad[:, ctx.padding : grad.shape[1] - ctx.padding], None


def _pad_frames_setup(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.padding = inputs[1]


pad_frames.register_autograd(_pad_frames_backward, setup_context=_pad_frames_setup)


def realize_for_compiler(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself in eager mode; under torch.compile (inductor) a buffer of its own, written by the kernel that
    computes it, instead of an expression inlined into every consumer's reads. Inductor's stride-forcing primitive
    with ``x``'s own strides: no copy, no gradient (inference only)."""
    import torch._inductor.inductor_prims  # noqa: F401  (registers the primitive)

    return torch.ops.prims.inductor_force_stride_order(x, x.stride())


def depthwise_shifted_sum(x: torch.Tensor, weight: torch.Tensor, padding: int, dilation: int,
                          input_form: str = "fused") -> torch.Tensor:
    """Depth-wise conv along the last axis as a sum of ``K`` shifted, scaled slices of ``x``, accumulated in
    float32 (float64 input in float64).

    x: ``[B, C, 1, T]`` (any strides), weight: ``[C, 1, 1, K]`` -> ``[B, C, 1, T + 2 * padding - dilation * (K - 1)]``
    in ``x``'s dtype: the same sums as ``F.conv2d(x, weight, padding=(0, padding), dilation=(1, dilation),
    groups=C)``. ``input_form`` (what a compiler makes of the padded input; same values in eager mode): "fused"
    (``F.pad``: the compiler may recompute x's producer inside every tap's read), "stored" (:func:`pad_frames`,
    an operator the compiler cannot fuse: x is stored, then copied into a padded buffer) or "realized"
    (``F.pad`` + :func:`realize_for_compiler`: x's producer writes the padded buffer itself; with gradients it
    falls back to "stored", as the primitive has none).
    """
    if input_form not in SHIFTED_SUM_INPUTS.values():
        raise ValueError(f"input_form must be one of {tuple(SHIFTED_SUM_INPUTS.values())}, got {input_form!r}")
    taps = weight.shape[-1]
    if input_form == "fused":
        padded = F.pad(x, (padding, padding))
    else:  # padded in the [B, T, C] layout of the model's activations, then viewed as [B, C, 1, T']
        btc = x.squeeze(2).transpose(1, 2)
        if input_form == "realized" and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            btc = realize_for_compiler(F.pad(btc, (0, 0, padding, padding)))
        else:
            btc = pad_frames(btc, padding)
        padded = btc.transpose(1, 2).unsqueeze(2)
    length = padded.shape[-1] - dilation * (taps - 1)
    acc = torch.promote_types(x.dtype, torch.float32)
    w = weight.to(acc).reshape(1, -1, 1, taps)
    out = padded[..., :length].to(acc) * w[..., :1]
    for k in range(1, taps):
        out = out + padded[..., k * dilation:k * dilation + length].to(acc) * w[..., k:k + 1]
    return out.to(x.dtype)


def store_taps_outermost(weight: torch.Tensor, tap_dim: int, outermost: bool) -> None:
    """Re-lay a depth-wise conv weight out in memory, in place: its taps outermost (``outermost``) or contiguous.
    Values, shape and state-dict entry stay the same.

    For the compiled shifted sums: the compiler inlines the weight into the conv kernel, indexing it with the
    parameter's own strides, so a contiguous ``[C, 1, K]`` weight is read at a stride of ``K`` across neighbouring
    channels (a gather in every tap; on the CPU it also kept the loop from vectorising: 190 -> 120 ms for one
    2048-channel, 8,000-frame conv with the taps outermost). The conv kernels want it contiguous.
    """
    data = weight.data
    weight.data = data.movedim(tap_dim, 0).contiguous().movedim(0, tap_dim) if outermost else data.contiguous()


def _dilated_kernel(weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """``[C, k, 1, K]`` kernel with ``dilation - 1`` zeros between taps: an undilated conv with it sums the same
    products as a dilated conv with ``weight``."""
    taps = weight.shape[-1]
    return F.pad(weight.unsqueeze(-1), (0, dilation - 1)).flatten(-2)[..., : (taps - 1) * dilation + 1]


def conv_along_time(x: torch.Tensor, weight: torch.Tensor, padding: int, dilation: int, groups: int,
                    cuda_layout: str = "") -> torch.Tensor:
    """Grouped conv along the last axis of ``x`` ``[B, C_in, 1, T]`` with ``weight`` ``[C, k, 1, K]``.

    ``cuda_layout``: one of ``CUDA_DEPTHWISE_LAYOUTS`` for CUDA inputs, or "" for the module-wide default.

    ``x`` is usually a channels-last view of a ``[B, T, C]`` activation, which oneDNN convolves in place for
    inference (10-30x faster than copying to ``[B, C, T]`` first). oneDNN's channels-last depth-wise kernel hangs
    in bf16 for small channel counts (seen with 16 channels, torch 2.13), so reduced precision on CPU takes the
    plain layout, as does training (faster backward), except while tracing (see below).
    """
    if x.device.type == "cpu":
        # No grad-mode branch while tracing: torch.jit.trace checks its graph by tracing again under no_grad, and
        # two layouts would be two graphs; a traced graph is for inference, which takes the channels-last path.
        training_layout = not torch.jit.is_tracing() and torch.is_grad_enabled()
        if x.dtype != torch.float32 or (training_layout and (x.requires_grad or weight.requires_grad)):
            # Under autocast x is already bf16 (Linear output). With gradients, oneDNN's plain-layout forward +
            # backward is faster than its channels-last one (measured 1.3-2.4x for 64-128 channels, dilated too).
            x = x.contiguous()
        elif dilation > 1 and not (torch.jit.is_scripting() or torch.jit.is_tracing()):
            # oneDNN has no fast channels-last kernel for dilated depth-wise convs (~75x slower measured), so the
            # kernel is dilated itself (zeros between taps): the same sums, computed by the fast undilated kernel.
            weight = _dilated_kernel(weight, dilation)
            dilation = 1
    elif not torch.jit.is_scripting() and x.is_cuda:  # the default is a Python global, which TorchScript cannot read
        layout = cuda_layout or CUDA_DEPTHWISE_LAYOUT
        if layout.startswith("shifted_sum") and weight.shape[1] == 1:
            return depthwise_shifted_sum(x, weight.to(x.dtype), padding, dilation, SHIFTED_SUM_INPUTS[layout])
        if layout == "contiguous":
            x = x.contiguous()
    return F.conv2d(x, weight, padding=(0, padding), dilation=(1, dilation), groups=groups)


class _Transpose12(nn.Module):
    """Parameter-free ``[B, T, C] <-> [B, C, T]``; keeps the official ``sequential.1`` key position."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class DepthwiseConv1d(nn.Module):
    """Depth-wise Conv1d without bias, same-length padding. x: ``[B, C, T]`` -> ``[B, C, T]``."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2,
                              groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConvModule(nn.Module):
    """Residual depth-wise convolution along time. x: ``[B, T, C]`` -> ``[B, T, C]``.

    ``mask`` ``[B, T, 1]`` (1 = valid frame) zeroes padded frames of the conv input, so valid frames see the
    same zero padding as an unpadded item.
    """

    def __init__(self, channels: int, kernel_size: int = 17) -> None:
        super().__init__()
        self.sequential = nn.Sequential(_Transpose12(), DepthwiseConv1d(channels, kernel_size))
        # x + conv(x) is one conv whose centre tap is raised by 1 (same-length padding): folding the residual
        # into the kernel saves a full pass over the (up to 2048-wide) activation. Not saved in the state dict.
        identity = torch.zeros(1, 1, 1, kernel_size)
        identity[..., (kernel_size - 1) // 2] = 1.0
        self.register_buffer("identity_tap", identity, persistent=False)
        self.cuda_depthwise_layout = ""  # "" = the module-wide CUDA_DEPTHWISE_LAYOUT

    def depthwise_weights(self) -> tuple[torch.Tensor, ...]:
        """The depth-wise conv weights (taps on dim 2) that ``MossFormer2.set_cuda_depthwise_layout`` lays out."""
        return (self.sequential[1].conv.weight,)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        conv = self.sequential[1].conv
        weight = conv.weight.unsqueeze(2) + self.identity_tap.to(conv.weight.dtype)  # [C, 1, 1, K]
        # Padded frames may hold any value after this (x instead of 0); every later time-mixing op masks them.
        inp = x if mask is None else x * mask
        # The same depth-wise conv as a 2-D conv on the [B, C, 1, T] view of x, which is channels-last in
        # memory: oneDNN / cuDNN then convolve in place of layout instead of first copying x to [B, C, T]
        # (about 10-30x faster on CPU), and the output is already [B, T, C] in memory.
        out = conv_along_time(inp.transpose(1, 2).unsqueeze(2), weight, conv.padding[0], 1, conv.groups,
                              self.cuda_depthwise_layout)
        return out.squeeze(2).transpose(1, 2)


class FeedForwardConv(nn.Module):
    """FFConvM: norm -> Linear -> SiLU -> ConvModule -> Dropout. x: ``[B, T, d_in]`` -> ``[B, T, d_out]``.

    ``norm`` is ScaleNorm in the FLASH layers and LayerNorm in the gated FSMN. ``mask``: see ConvModule.
    """

    def __init__(self, dim_in: int, dim_out: int, norm: nn.Module, kernel_size: int = 17,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.mdl = nn.Sequential(
            norm,
            nn.Linear(dim_in, dim_out),
            nn.SiLU(),
            ConvModule(dim_out, kernel_size),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.mdl[2](self.mdl[1](self.mdl[0](x)))  # norm, Linear, SiLU
        return self.mdl[4](self.mdl[3](x, mask))  # ConvModule (masked), Dropout

"""MossFormer2 separation network: encoder, mask net (single-path MossFormer + gated FSMN), decoder.

Module names follow the official MossFormer2_SS_16K inner model so that ``state_dict()`` keys equal the released
checkpoint's (``enc.*``, ``mask_net.*``, ``dec.*``).
"""


import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mossformer2.models.config import MossFormer2Config, resolve_config
from mossformer2.models.convolution import CUDA_DEPTHWISE_LAYOUTS, store_taps_outermost
from mossformer2.models.embeddings import RotaryEmbedding, ScaledSinusoidalEmbedding
from mossformer2.models.flash import FLASHLayer
from mossformer2.models.fsmn import GatedFSMNBlock
from mossformer2.models.norms import FrameGroupNorm

# torch.compile modes for MossFormer2.compile_layers (None: torch's default).
COMPILE_LAYER_MODES = (None, "default", "max-autotune-no-cudagraphs")

class Encoder(nn.Module):
    """Strided Conv1d (no bias) + ReLU. wave ``[B, T]`` -> ``[B, E, F]``, F = (T - K) // (K/2) + 1."""

    def __init__(self, kernel_size: int, out_channels: int) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(1, out_channels, kernel_size, stride=kernel_size // 2, bias=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv1d(wave.unsqueeze(1)))


class MossFormerLayers(nn.Module):
    """L pairs of (FLASH layer, gated FSMN block) sharing one rotary embedding. x: ``[B, F, D]``, mask
    ``[B, F, 1]`` (1 = valid frame) or None.

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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return self._forward_checkpointed(x, mask)
        for flash, fsmn in zip(self.layers, self.fsmn):
            x = fsmn(flash(x, mask), mask)
        return x

    @torch.jit.unused
    def _forward_checkpointed(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for flash, fsmn in zip(self.layers, self.fsmn):
            x = checkpoint(flash, x, mask, use_reentrant=False)
            x = checkpoint(fsmn, x, mask, use_reentrant=False)
        return x


class MossFormerModule(nn.Module):
    """The layer stack followed by LayerNorm(eps 1e-6). x: ``[B, F, D]`` -> ``[B, F, D]``."""

    def __init__(self, config: MossFormer2Config) -> None:
        super().__init__()
        self.mossformerM = MossFormerLayers(config)
        self.norm = nn.LayerNorm(config.mossformer_sequence_dim, eps=1e-6)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(self.mossformerM(x, mask))


class ComputationBlock(nn.Module):
    """Single-path block: MossFormer over time, GroupNorm, skip connection. x: ``[B, D, F]`` -> ``[B, D, F]``;
    mask ``[B, F, 1]`` (1 = valid frame) or None."""

    def __init__(self, config: MossFormer2Config) -> None:
        super().__init__()
        self.intra_mdl = MossFormerModule(config)
        self.intra_norm = FrameGroupNorm(1, config.mossformer_sequence_dim, eps=1e-8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        intra = self.intra_mdl(x.transpose(1, 2), mask).transpose(1, 2)
        return self.intra_norm(intra, None if mask is None else mask.transpose(1, 2)) + x


class MaskNet(nn.Module):
    """Estimates one non-negative mask per speaker. x: ``[B, E, F]`` -> masks ``[S, B, E, F]``.

    ``frame_mask`` ``[B, F, 1]`` (1 = valid frame) restricts every statistic to each item's own frames.
    """

    def __init__(self, config: MossFormer2Config) -> None:
        super().__init__()
        E, D, S = config.encoder_embedding_dim, config.mossformer_sequence_dim, config.num_spks
        self.num_spks = S
        self.norm = FrameGroupNorm(1, E, eps=1e-8)
        self.conv1d_encoder = nn.Conv1d(E, D, 1, bias=False)
        self.pos_enc = ScaledSinusoidalEmbedding(D)
        self.mdl = ComputationBlock(config)
        self.conv1d_out = nn.Conv1d(D, D * S, 1)
        self.conv1_decoder = nn.Conv1d(D, E, 1, bias=False)
        self.prelu = nn.PReLU()
        self.output = nn.Sequential(nn.Conv1d(D, D, 1), nn.Tanh())
        self.output_gate = nn.Sequential(nn.Conv1d(D, D, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        time_mask = None if frame_mask is None else frame_mask.transpose(1, 2)  # [B, 1, F]
        x = self.conv1d_encoder(self.norm(x, time_mask))  # [B, D, F]
        x = x + self.pos_enc(x.shape[-1], x.device).transpose(0, 1).to(x.dtype)
        x = self.conv1d_out(self.prelu(self.mdl(x, frame_mask)))  # [B, S*D, F]
        B, _, n = x.shape
        x = x.reshape(B * self.num_spks, -1, n)  # speaker k takes channels k*D..(k+1)*D-1
        x = self.conv1_decoder(self.output(x) * self.output_gate(x))
        masks = F.relu(x.reshape(B, self.num_spks, -1, n))
        return masks.transpose(0, 1)


class MossFormer2(nn.Module):
    """MossFormer2 speech separation network (official MossFormer2_SS_16K layout).

    ``forward(wave, lengths=None)``: wave ``[B, T]`` float at ``config.sample_rate`` -> separated sources
    ``[B, S, T]``. ``lengths`` ``[B]`` (samples) marks a zero-padded batch: item b is treated as
    ``wave[b, :lengths[b]]`` alone would be (normalisation, attention and convolutions see only its frames) and
    its output is zero beyond its length.
    """

    accepts_lengths = True  # callers may batch unequal inputs with padding
    # Inference-time refinements its checkpoint recommends ({name: on}; set by the loaders, saved with the weights,
    # the Separator's defaults): not part of the network. (Annotated here: TorchScript cannot type an empty dict.)
    separation_settings: dict[str, bool]

    def __init__(self, config: MossFormer2Config | dict | str | None = None) -> None:
        """``config``: a ``MossFormer2Config``, a dict of its fields, a named config or None (the official one)."""
        super().__init__()
        self.config = resolve_config(config)
        c = self.config
        self.num_spks = c.num_spks
        self.kernel_size = c.encoder_kernel_size
        self.min_input_length = c.min_input_length
        self.enc = Encoder(c.encoder_kernel_size, c.encoder_embedding_dim)
        self.mask_net = MaskNet(c)
        self.dec = nn.ConvTranspose1d(c.mossformer_sequence_dim, 1, c.encoder_kernel_size,
                                      stride=c.encoder_kernel_size // 2, bias=False)
        self.separation_settings = {}

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self.check_input(wave, lengths)
        return self.forward_unchecked(wave, lengths)

    def forward_unchecked(self, wave: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` without :meth:`check_input`, whose finiteness test waits for the device: CUDA graph capture
        allows no host synchronisation, so graph runners check the real input and capture this."""
        T = wave.shape[-1]
        feats = self.enc(wave)  # [B, E, F]
        B, n = feats.shape[0], feats.shape[-1]
        frame_mask: torch.Tensor | None = None
        if lengths is not None:
            frames = torch.div(lengths.to(feats.device) - self.kernel_size, self.kernel_size // 2,
                               rounding_mode="floor") + 1
            frame_mask = (torch.arange(n, device=feats.device)[None, :] < frames[:, None]).to(feats.dtype)
            frame_mask = frame_mask.unsqueeze(-1)  # [B, F, 1]
        masks = self.mask_net(feats, frame_mask)  # [S, B, E, F]
        separated = feats.unsqueeze(0) * masks
        if frame_mask is not None:
            # Padded frames must not reach the overlap-add of the decoder.
            separated = separated * frame_mask.transpose(1, 2).unsqueeze(0)
        separated = separated.reshape(self.num_spks * B, -1, n)
        out = self.dec(separated).reshape(self.num_spks, B, -1).transpose(0, 1)  # [B, S, T']
        # The decoder yields (F-1)*hop + K <= T samples: zero-pad to the input length (no branch: exportable).
        return F.pad(out, (0, T - out.shape[-1]))

    def layer_stack(self) -> MossFormerLayers:
        """The (FLASH layer, gated FSMN block) pairs, deep inside the official module tree."""
        return self.mask_net.mdl.intra_mdl.mossformerM

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each layer pair in the backward pass instead of storing its activations (training memory)."""
        self.layer_stack().activation_checkpointing = enabled

    def set_cuda_depthwise_layout(self, layout: str) -> None:
        """How every depth-wise conv module runs on CUDA inputs: one of ``convolution.CUDA_DEPTHWISE_LAYOUTS``,
        or "" for the module-wide ``convolution.CUDA_DEPTHWISE_LAYOUT``. The shifted sums also get their weights
        re-laid out in memory (``convolution.store_taps_outermost``), which replaces the weight tensors' storage:
        set the layout before capturing CUDA graphs (a graph captured earlier would keep reading the old memory)."""
        if layout and layout not in CUDA_DEPTHWISE_LAYOUTS:
            raise ValueError(f"unknown depth-wise layout {layout!r}; choose from {CUDA_DEPTHWISE_LAYOUTS}")
        taps_outermost = layout.startswith("shifted_sum")
        for module in self.modules():
            if hasattr(module, "depthwise_weights"):
                module.cuda_depthwise_layout = layout
                for weight in module.depthwise_weights():
                    store_taps_outermost(weight, 2, taps_outermost)

    def compile_layers(self, dynamic: bool | None = None, layout: str = "shifted_sum_stored",
                       mode: str | None = None) -> "MossFormer2":
        """``torch.compile`` each FLASH layer and gated FSMN block in place; returns ``self``.

        Regional compilation: the FLASH layers share one compiled region and the FSMN blocks another, so it takes
        far less time than compiling the whole network. On CUDA the depth-wise convs become sums of shifted, scaled
        slices (``convolution.depthwise_shifted_sum``), which the compiler turns into elementwise kernels on the
        ``[B, T, C]`` layout: no layout copies and no conv kernel. The CPU keeps its convs.

        ``layout``: "shifted_sum_stored" (default) stores each conv's input once (``convolution.pad_frames``);
        "shifted_sum_realized" has the input's producer write the padded input itself (no copy; not yet measured
        on a GPU); "shifted_sum" lets the compiler fuse the producer (SiLU, norm + PReLU) into every tap's read.
        Either way the depth-wise weights are re-laid out with their taps outermost in memory
        (``convolution.store_taps_outermost``; values and state dict unchanged), so the compiled kernels read them
        along channels. The fused form gave wrong float32 output on an H200, the stored one does not; timings and
        accuracy per form are in benchmarks/RESULTS.md. On the CPU a compiled bf16 forward did not finish (torch
        2.13).
        ``dynamic``: as ``torch.compile``'s (``None``: static for the first input shape, one dynamic recompile on a
        second).
        ``mode``: ``torch.compile``'s mode for the regions: ``None`` / "default", or "max-autotune-no-cudagraphs"
        (benchmarks matrix-multiply kernels, epilogues fused in, against cuBLAS at compile time: minutes more per
        input shape). The modes that capture CUDA graphs are refused: each region would hold graphs of its own,
        and the whole forward is captured as one graph instead (``Separator(cuda_graphs=True)``).
        """
        if mode not in COMPILE_LAYER_MODES:
            raise ValueError(f"compile_layers: mode {mode!r} is not one of {', '.join(map(repr, COMPILE_LAYER_MODES))} "
                             "(the CUDA-graph modes are refused: capture the whole forward instead)")
        if not layout.startswith("shifted_sum"):
            raise ValueError(f"compile_layers runs the convs as shifted sums; got layout {layout!r}")
        if layout == "shifted_sum":
            warnings.warn('compile_layers(layout="shifted_sum") gave wrong float32 output on CUDA (H200, torch 2.11: '
                          '11.8 dB from eager); it is kept for measurements: use the default "shifted_sum_stored"',
                          stacklevel=2)
        self.set_cuda_depthwise_layout(layout)
        layers = self.layer_stack()
        for layer in [*layers.layers, *layers.fsmn]:
            layer.compile(dynamic=dynamic, mode=mode)
        return self

    def check_input(self, wave: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Raise ValueError with a readable message for input the network cannot process."""
        if not isinstance(wave, torch.Tensor):
            raise ValueError(f"MossFormer2 expects a torch.Tensor waveform [batch, samples], got {type(wave)}")
        if wave.dim() != 2:
            hint = ("use wave.unsqueeze(0) for a single signal" if wave.dim() == 1 else
                    "for [batch, 1, samples] use wave.squeeze(1); for several channels of one recording, "
                    "Separator (channels='mix' or 'each')")
            raise ValueError(f"MossFormer2 expects a waveform of shape [batch, samples], got shape "
                             f"{tuple(wave.shape)}; {hint}")
        if wave.shape[0] == 0:
            raise ValueError("the batch is empty (shape [0, samples]): pass one or more signals")
        if not wave.is_floating_point():
            raise ValueError(
                f"MossFormer2 expects floating-point samples in [-1, 1], got dtype {wave.dtype}; "
                "convert integer PCM first (e.g. int16 / 32768)"
            )
        weights = self.enc.conv1d.weight.dtype
        # Under autocast the ops cast their inputs themselves; otherwise a conv of mixed dtypes fails deep inside.
        if wave.dtype != weights and not torch.is_autocast_enabled(wave.device.type):
            raise ValueError(f"input dtype {wave.dtype} differs from the model's {weights}: pass wave.to({weights}) "
                             "(or convert the model, e.g. model.to(wave.dtype))")
        if wave.shape[-1] < self.min_input_length:
            raise ValueError(
                f"input has {wave.shape[-1]} samples but the network needs at least {self.min_input_length} "
                f"(two encoder frames of kernel {self.kernel_size}); the signal is too short to separate"
            )
        if not bool(torch.isfinite(wave).all()):
            raise ValueError("input contains NaN or infinite samples")
        if lengths is not None:
            if not isinstance(lengths, torch.Tensor) or lengths.shape != (wave.shape[0],):
                raise ValueError(f"lengths must be a tensor of shape [{wave.shape[0]}] (one length per item), "
                                 f"got {lengths if not isinstance(lengths, torch.Tensor) else tuple(lengths.shape)}")
            if lengths.is_floating_point() or lengths.is_complex():
                raise ValueError(f"lengths must be integer sample counts, got dtype {lengths.dtype}")
            low, high = int(lengths.min()), int(lengths.max())
            if low < self.min_input_length or high > wave.shape[-1]:
                raise ValueError(f"lengths must lie in [{self.min_input_length}, {wave.shape[-1]}] (the minimum "
                                 f"input and the padded length), got values from {low} to {high}")

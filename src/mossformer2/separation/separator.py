"""``Separator``: separate recordings of any length, rate and channel count with a MossFormer2 model.

Pipeline per input ``[C, T]`` at rate r: downmix (``channels="mix"``) or keep each channel (``"each"``) ->
soxr to the model rate -> level normalisation -> model (one pass, or overlapping chunks stitched with speaker
alignment and cross-fades, or the official ClearVoice windows) -> level restored -> soxr back to r.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np
from tqdm import tqdm

from mossformer2.audio import mean_square, peak_amplitude, read_audio, resample, resampled_length, to_mono
from mossformer2.models.config import min_input_length
from mossformer2.separation.backends import eval_mode, exported_model_device, is_torch_module, prepare_torch_model
from mossformer2.separation.batching import make_batches
from mossformer2.separation.inputs import (
    as_channels_first,
    as_input_kind,
    channels_cancel,
    check_choice,
    check_rate,
    is_real_number,
    tensor_device,
)
from mossformer2.separation.loading import load_separation_model
from mossformer2.separation.outputs import output_files, output_paths, write_separation
from mossformer2.separation.refine import (
    mixture_consistency,
    polarity_ensemble,
    wiener_filter,
)
from mossformer2.separation.stitching import (
    TARGET_RMS,
    clearvoice_audio_norm,
    clearvoice_pass_length,
    clearvoice_separate,
    clearvoice_window_count,
    correlation_signs,
    match_sources,
    plan_chunks,
    stitch_aligned,
)
from mossformer2.separation_settings import REFINEMENTS
from mossformer2.utils import bar_disabled, dtype_name, warnings_about

if TYPE_CHECKING:
    import torch

STITCHING = ("aligned", "clearvoice")
NORMALIZE = ("rms", "peak", "none", "clearvoice")
CHANNELS = ("mix", "each")
BACKENDS = ("auto", "torch", "onnxruntime")
TARGET_PEAK = 0.9
CHUNK_SECONDS, OVERLAP_SECONDS = 10.0, 2.0  # the defaults
# chunk_seconds=None: the chunk length that makes every input one pass, and the input length above which that
# draws a warning (memory grows with the length of a pass).
ONE_PASS, ONE_PASS_WARN_SECONDS = sys.maxsize, 60.0
# Below this overlap the speaker matching of consecutive chunks often goes wrong (an audit measured swaps at
# 0.1-0.5 s, and at 1 s with 4 s chunks), so shorter overlaps are warned about.
SAFE_OVERLAP_SECONDS = 1.0
# Below float32's smallest normal number (about -758 dBFS) a recording is silence, and bringing it to the model's
# level needs a gain float32 cannot hold (an all-denormal file failed as "NaN or infinite samples").
SILENCE_FLOOR = float(np.finfo(np.float32).tiny)
MAX_GAIN = TARGET_PEAK / SILENCE_FLOOR  # what brings the quietest peak that is not silence to TARGET_PEAK


class Separator:
    """Separate speech mixtures with a model ``[B, T] -> [B, S, T]`` at ``model.config.sample_rate``.

    Args:
        model: a torch module, or any callable on float32 NumPy arrays ``[B, T] -> [B, S, T]`` with a ``.config``
            (e.g. the ONNX Runtime wrapper ``mossformer2.runtime.OnnxRuntimeModel``). With such a callable the
            Separator never imports torch (an ONNX deployment needs NumPy, SciPy, PyYAML, soundfile, soxr, tqdm and
            onnxruntime only). A torch module is moved to ``device`` (and a float16 one on the CPU cast to float32)
            in place, not copied: its weights may be gigabytes.
        device: "auto" | "cpu" | "cuda[:N]" (torch backend only).
        dtype: "float32" | "bfloat16" | "float16": autocast precision; float16 needs CUDA (falls back to float32
            with a warning on CPU). A model already cast to bf16 / fp16 (``model.bfloat16()``) gets its input in
            that dtype; a float16 model on the CPU is cast back to float32, with a warning.
        chunk_seconds / overlap_seconds: inputs longer than a chunk are separated in overlapping chunks
            (``stitching="aligned"``; the overlap, where the speakers are matched, must not be 0, and below
            1 s the speakers may swap between chunks: a warning says so); memory then no longer grows with the
            file length beyond the audio. ``chunk_seconds=None``: every input in one pass, whatever its length
            (memory grows with it): the standard protocol of test sets, and ``mossformer2 evaluate``'s default.
        stitching: "aligned" (speaker order aligned on each overlap by SI-SDR, raised-cosine cross-fade) or
            "clearvoice" (the official tool's 2 s windows, ClearVoice's ``decode_one_audio_mossformer2_ss_16k``
            in path mode, for identical output; like the official tool, it leaves up to the last 0.25 s silent
            for some lengths: its last window writes only up to its give-up margin).
        normalize: "rms" (model sees -25 dBFS RMS, outputs scaled back to the input level), "peak" (peak 0.9,
            scaled back), "none", or "clearvoice" (the official ``audio_norm``; outputs stay at that level).
            ``stitching="clearvoice", normalize="clearvoice", channels="each"`` is the official path mode; on
            16 kHz files it gives the official tool's samples (it resamples other rates with librosa, we use soxr).
        batch_size: chunks / short inputs per forward pass. Short inputs are sorted by length and zero-padded
            (our network takes their true lengths, so each output equals the unbatched one); models without
            ``lengths`` support (ONNX, official modules) batch equal-length inputs only.
        channels: "mix" (downmix to mono, output ``[S, T]``) or "each" (separate every channel, ``[S, C, T]``;
            each channel's speaker order is matched to the first non-silent channel's over the whole signal, and
            its polarity stays as that channel recorded it; with ``stitching="clearvoice"`` the channels stay
            independent, as in the official tool).
        progress: show a tqdm bar over the chunks of long inputs; ``None``: only when stderr is a terminal.
        cuda_graphs: on CUDA, replay a captured CUDA graph per chunk shape instead of launching the network's
            kernels one by one (much lower latency at small batches; costs one capture per shape and the graph's
            activation memory). Padded batches of unequal short inputs still run eagerly. Ignored on the CPU.
        compile_layers: compile the network's layers with ``torch.compile`` (``MossFormer2.compile_layers``, in
            place; our MossFormer2 only). Meant for CUDA, with ``cuda_graphs``: about 2.5-3x faster per call there
            than a CUDA graph alone, after 30-70 s of compiling (benchmarks/RESULTS.md). The first input shape
            compiles a static graph; a second shape compiles once more, into one dynamic-shape graph that then
            serves every length. On the CPU it runs in float32 only and is slower than the eager network (with a
            warning).
        polarity_ensemble: also separate the negated input and average the two estimates (twice the compute;
            ``refine.polarity_ensemble``). ``None``: as the checkpoint recommends (see below), else off.
        wiener_filter: re-estimate the sources of each pass as soft masks on the input's STFT, in proportion to
            their estimated powers (``refine.wiener_filter``; the outputs then sum to the input). ``None``: as the
            checkpoint recommends, else off.
        mixture_consistency: make the sources of each pass sum to its input (``refine.mixture_consistency``; for
            models whose outputs are at the sources' level). ``None``: as the checkpoint recommends, else off.

    Attributes ``device`` and ``dtype``: with a torch module, the ``torch.device`` it runs on and the
    ``torch.dtype`` it computes in; with an exported (NumPy-callable) model, which needs no torch, the strings
    ``"cpu"`` / ``"cuda"`` and ``"float32"`` (``str(sep.device)`` reads the same on both).

    A model from ``load_separation_model`` carries its checkpoint's recommended refinements as
    ``model.separation_settings`` (the built-in model recommends the polarity ensemble and the Wiener filter: its
    model card has the measurements). They apply in that order: ensemble, Wiener filter, mixture consistency.
    With the Wiener filter or mixture consistency the outputs sum to the input (band-limited to the model's rate)
    under ``stitching="aligned"``; the official ``"clearvoice"`` stitching scales each output to the input's RMS,
    as the official tool does, which the sum does not survive.
    """

    def __init__(self, model: Any, device: str | torch.device = "auto", dtype: str | torch.dtype = "float32",
                 chunk_seconds: float | None = CHUNK_SECONDS, overlap_seconds: float = OVERLAP_SECONDS,
                 stitching: str = "aligned", normalize: str = "rms", batch_size: int = 1, channels: str = "mix",
                 backend: str = "auto",
                 progress: bool | None = False, cuda_graphs: bool = False, compile_layers: bool = False,
                 polarity_ensemble: bool | None = None, mixture_consistency: bool | None = None,
                 wiener_filter: bool | None = None) -> None:
        check_choice("stitching", stitching, STITCHING)
        check_choice("normalize", normalize, NORMALIZE)
        check_choice("channels", channels, CHANNELS)
        check_choice("backend", backend, BACKENDS)
        chunked = chunk_seconds is not None
        overlap_seconds = _check_chunking_options(chunk_seconds, overlap_seconds, stitching)
        if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool):
            raise ValueError(f"batch_size (--batch-size) must be a whole number, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size (--batch-size) must be >= 1, got {batch_size}")
        _check_model(model, backend, compile_layers)
        self.is_torch = is_torch_module(model)
        self.sample_rate = int(model.config.sample_rate)
        self.num_spks = int(model.config.num_spks)
        self.min_samples = int(getattr(model, "min_input_length", 0)
                               or min_input_length(int(getattr(model.config, "encoder_kernel_size", 1))))
        # An ONNX export without --dynamic-length takes one input length only: its time axis is a fixed int.
        shape = None if self.is_torch else getattr(model, "input_shape", None)
        self.fixed_length = int(shape[-1]) if shape and isinstance(shape[-1], int) else None
        # Every option checked before the model is prepared, which moves, casts or compiles it in place.
        self.chunk, self.overlap = self._chunk_samples(chunk_seconds, overlap_seconds, stitching)
        self.graphs = None
        if self.is_torch:
            setup = prepare_torch_model(model, device, dtype, chunked=chunked, cuda_graphs=cuda_graphs,
                                        compile_layers=compile_layers)
            model, self.dtype, self.device = setup.model, setup.dtype, setup.device
            self.input_dtype, self.graphs = setup.input_dtype, setup.graphs
        else:
            self.device = exported_model_device(model, device, dtype)
            self.dtype = "float32"
        self.model = model
        # Our MossFormer2 takes true lengths, which makes zero-padded batches of unequal inputs exact.
        self.pads_batches = self.is_torch and bool(getattr(model, "accepts_lengths", False))
        self.stitching = stitching
        self.normalize = normalize
        self.batch_size = int(batch_size)
        self.channels = channels
        self.progress = progress
        recommended = getattr(model, "separation_settings", {})  # None: as the checkpoint recommends, else off
        self.polarity_ensemble = _chosen(polarity_ensemble, recommended.get("polarity_ensemble"))
        self.wiener_filter = _chosen(wiener_filter, recommended.get("wiener_filter"))
        self.mixture_consistency = _chosen(mixture_consistency, recommended.get("mixture_consistency"))

    def _chunk_samples(self, chunk_seconds: float | None, overlap_seconds: float, stitching: str) -> tuple[int, int]:
        """``(chunk, overlap)`` in samples at the model rate (:data:`ONE_PASS` for ``chunk_seconds=None``), checked
        there: lengths distinct in seconds may round to equal or zero samples. A fixed-length ONNX export chunks
        at its length by default."""
        chunked = chunk_seconds is not None
        chunk = int(round(chunk_seconds * self.sample_rate)) if chunked else ONE_PASS
        overlap = int(round(overlap_seconds * self.sample_rate))
        if chunk < self.min_samples:
            raise ValueError(f"chunk_seconds={chunk_seconds} is shorter than the model kernel")
        if chunked and not overlap < chunk:
            raise ValueError(f"overlap_seconds={overlap_seconds:g} is not shorter than chunk_seconds={chunk_seconds:g} "
                             f"(--overlap-seconds, --chunk-seconds: {overlap} and {chunk} samples at "
                             f"{self.sample_rate} Hz): the overlap must be shorter than the chunk")
        if chunked and stitching == "aligned" and overlap == 0:
            # Speaker order and polarity are matched on the overlap of consecutive chunks: with none, they swap
            # between chunks (an audit measured a third of the seconds on the right speaker at overlap 0).
            size = "is 0" if overlap_seconds == 0 else f"is under one sample at {self.sample_rate} Hz"
            raise ValueError(f"overlap_seconds={overlap_seconds:g} (--overlap-seconds) {size}: aligned stitching "
                             "matches the speakers of consecutive chunks on their overlap, which must be above 0 "
                             "(default 2)")
        if (self.fixed_length is not None and stitching == "aligned"
                and (not chunked or (chunk_seconds, overlap_seconds) == (CHUNK_SECONDS, OVERLAP_SECONDS))):
            # Chunks of exactly the export's length by default (and for "one pass": the only length it takes).
            seconds = self.fixed_length / self.sample_rate
            chunk = self.fixed_length
            overlap = int(round(_fixed_length_overlap(seconds) * self.sample_rate))
            if overlap < SAFE_OVERLAP_SECONDS * self.sample_rate:
                warnings.warn(f"the model was exported with a fixed input length of {seconds:g} s: chunks of that "
                              f"length overlap by {overlap / self.sample_rate:g} s only, where speakers may swap "
                              "between chunks (export a longer --length-seconds, or --dynamic-length)", stacklevel=3)
        return chunk, overlap

    @classmethod
    def from_pretrained(cls, ref: str | Path | None = None, device: str | torch.device = "auto",
                        filename: str | None = None, cache_dir: str | Path | None = None,
                        **kwargs: Any) -> Separator:
        """``None``: the model shipped with the package; else a model name (``"default"``,
        ``"MossFormer2_SS_16K"``), a checkpoint file or folder, a hub id (``alibabasglab/MossFormer2_SS_16K``), an
        exported ``.onnx`` file (ONNX Runtime backend) or an exported TorchScript file.

        ``filename``: the file to take from a folder or hub repository (default: see
        ``hub.resolve_checkpoint``); ``cache_dir``: the Hugging Face cache to use. Other keyword arguments go to
        ``Separator(...)`` (``chunk_seconds``, ``wiener_filter``, ...)."""
        model = load_separation_model(ref, device, filename=filename, cache_dir=cache_dir)
        return cls(model, device=device, **kwargs)

    def __repr__(self) -> str:
        on = [name for name, used in self.refinements.items() if used]
        return (f"Separator({type(self.model).__name__}, {self.sample_rate} Hz, {self.num_spks} speakers, "
                f"device={self.device}, dtype={dtype_name(self.dtype)}, "
                f"chunk_seconds={_seconds(self.chunk_seconds)}, overlap_seconds={_seconds(self.overlap_seconds)}, "
                f"stitching={self.stitching!r}, "
                f"normalize={self.normalize!r}, channels={self.channels!r}, refinements={on})")

    @property
    def chunk_seconds(self) -> float | None:
        """The chunk length in seconds; None: every input in one pass."""
        return None if self.chunk == ONE_PASS else self.chunk / self.sample_rate

    @property
    def overlap_seconds(self) -> float | None:
        """The overlap of consecutive chunks in seconds; None without chunks."""
        return None if self.chunk == ONE_PASS else self.overlap / self.sample_rate

    @property
    def fixes_polarity(self) -> bool:
        """Whether the refinements make each pass's outputs sum to its input, which fixes their sign."""
        return bool(self.wiener_filter or self.mixture_consistency)

    @property
    def refinements(self) -> dict[str, bool]:
        """``{name: on}`` for every name in ``separation_settings.REFINEMENTS``: what this Separator applies."""
        return {name: bool(getattr(self, name)) for name in REFINEMENTS}

    # -- model call --------------------------------------------------------------------------------------------

    def _separate_pass(self, batch: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """``[B, L]`` float32 (zero-padded items of ``lengths`` samples, if given) -> ``[B, S, L]``, refined."""
        if self.polarity_ensemble:
            out = polarity_ensemble(self._run_model, batch, lengths)
        else:
            out = self._run_model(batch, lengths)
        if self.wiener_filter:
            out = wiener_filter(out, batch, lengths)
        if self.mixture_consistency:
            out = mixture_consistency(out, batch, lengths)
        return out

    def _run_model(self, batch: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """One forward pass of the model: ``[B, L]`` float32 -> ``[B, S, L]`` float32."""
        if self.is_torch:
            out = self._run_torch_model(batch, lengths)
        else:
            out = self.model(batch)
            if isinstance(out, (list, tuple)):
                out = np.stack([np.asarray(o) for o in out], axis=1)
            out = np.asarray(out, dtype=np.float32)
        if (out.ndim != 3 or out.shape[0] != batch.shape[0] or out.shape[-1] != batch.shape[-1]
                or out.shape[1] != self.num_spks):
            raise ValueError(f"model returned shape {tuple(out.shape)} for input {tuple(batch.shape)}; "
                             f"expected [B, S, T] with S = config.num_spks = {self.num_spks}")
        if not np.isfinite(out).all():  # (the refinements' speaker matching would fail on it, unclearly)
            cause = ("float16 overflowed: use dtype bfloat16 or float32 (--dtype)"
                     if dtype_name(self.dtype) == "float16"
                     else "its weights may hold NaN/inf values (a diverged training run?)")
            raise ValueError(f"the model returned NaN or infinite values: {cause}")
        return out

    def _run_torch_model(self, batch: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
        import torch

        wave = torch.from_numpy(batch).to(self.device, self.input_dtype)
        lengths_t = None if lengths is None else torch.from_numpy(np.asarray(lengths)).to(self.device)
        with torch.inference_mode(), eval_mode(self.model):
            if self.graphs is not None:
                out = self.graphs(wave, lengths_t)  # applies the autocast dtype itself
            else:
                autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                            else contextlib.nullcontext())
                with autocast:
                    out = self.model(wave) if lengths_t is None else self.model(wave, lengths_t)
            if isinstance(out, (list, tuple)):  # official models return a list of S tensors [B, L]
                out = torch.stack(list(out), dim=1)
            return out.float().cpu().numpy()

    # -- public API --------------------------------------------------------------------------------------------

    @overload
    def separate(self, wave: np.ndarray, sample_rate: int, output_rate: int | None = None) -> np.ndarray: ...

    @overload
    def separate(self, wave: torch.Tensor, sample_rate: int, output_rate: int | None = None) -> torch.Tensor: ...

    def separate(self, wave: np.ndarray | torch.Tensor, sample_rate: int,
                 output_rate: int | None = None) -> np.ndarray | torch.Tensor:
        """Separate one recording ``[T]`` or ``[C, T]`` at ``sample_rate`` (Hz, a whole number, 1000 to 768000).

        ``[C, T]`` is the C channels of one recording (mixed down, or separated one by one with
        ``channels="each"``), not a batch: for a batch ``[B, T]`` of recordings use ``separate_many(batch)``.

        Float samples are taken as they are (full scale 1.0); integer PCM (int16 / int32 / uint8, as
        ``scipy.io.wavfile.read`` returns it) is scaled to [-1, 1] as ``read_audio`` reads such files. A silent
        recording gives silent speakers (``mossformer2 separate`` refuses silent files instead).
        Returns float32 ``[S, T']`` (``channels="mix"``) or ``[S, C, T']`` (``"each"``) at ``output_rate``
        (default ``None``: the input rate, where T' = T): a NumPy array, or for a torch tensor a tensor on its
        device.
        """
        return self._separate_many([wave], sample_rate, output_rate)[0]

    @overload
    def separate_many(self, waves: Iterable[np.ndarray], sample_rate: int, output_rate: int | None = None, *,
                      release_inputs: bool = False) -> list[np.ndarray]: ...

    @overload
    def separate_many(self, waves: Iterable[torch.Tensor], sample_rate: int, output_rate: int | None = None, *,
                      release_inputs: bool = False) -> list[torch.Tensor]: ...

    @overload
    def separate_many(self, waves: Iterable[np.ndarray | torch.Tensor], sample_rate: int,
                      output_rate: int | None = None, *,
                      release_inputs: bool = False) -> list[np.ndarray | torch.Tensor]: ...

    def separate_many(self, waves: Iterable[np.ndarray | torch.Tensor], sample_rate: int,
                      output_rate: int | None = None, *,
                      release_inputs: bool = False) -> list[np.ndarray | torch.Tensor]:
        """Separate several recordings at one rate; equal-length short inputs share forward passes (inputs and
        outputs as in ``separate``; ``waves`` may be any iterable: a generator failed after all the work).

        ``release_inputs=True`` (``waves`` a list): each item of ``waves`` is replaced by None once it is at the
        model rate, so that a recording nothing else refers to (one read from a file for this call) is freed
        before its outputs are made: for an hour of 44.1 kHz stereo, 1.2 GB less at the peak. (After an error,
        the items before the one that failed are already None.)
        """
        _refuse_path(waves, "separate_many")  # (a path is an iterable too: of its characters)
        if release_inputs and not isinstance(waves, list):
            raise TypeError(f"release_inputs=True needs the inputs in a list (it empties it), got {type(waves)}")
        return self._separate_many(waves if release_inputs else list(waves), sample_rate, output_rate,
                                   release_inputs)

    def _separate_many(self, waves: list, sample_rate: int, output_rate: int | None,
                       release_inputs: bool = False) -> list[np.ndarray | torch.Tensor]:
        # Both public methods call this directly: its warnings (stacklevel 3; 4 from _model_items and
        # _separate_items) name the user's line whichever they called.
        sample_rate = check_rate("sample_rate", sample_rate)
        out_rate = sample_rate if output_rate is None else check_rate("output_rate", output_rate)
        # Flatten every input into mono model-rate items: (input index, channel, gain) and the wave.
        items: list[tuple[int, int, float]] = []
        model_waves: list[np.ndarray] = []
        shapes: list[tuple[int, int]] = []
        devices = []  # each tensor input's device (its outputs are returned as tensors there), None for NumPy
        for index in range(len(waves)):
            raw = waves[index]
            _refuse_path(raw, "separate" if len(waves) == 1 else "separate_many")
            devices.append(tensor_device(raw))
            shape, prepared = self._model_items(raw, index, sample_rate)
            del raw
            if release_inputs:
                waves[index] = None
            shapes.append(shape)
            for c, (model_wave, gain) in enumerate(prepared):
                items.append((index, c, gain))
                model_waves.append(model_wave)
        separated: list = self._separate_items(model_waves)
        if self.channels == "each" and self.stitching == "aligned":  # ClearVoice's channels stay independent
            for index in range(len(waves)):
                rows = [k for k, item in enumerate(items) if item[0] == index]
                aligned = _aligned_channels([separated[k] for k in rows], [model_waves[k] for k in rows],
                                            keep_polarity=self.fixes_polarity)
                for k, sources in zip(rows, aligned):
                    separated[k] = sources
        model_waves.clear()
        # One output array per input, made item by item, each model-rate item freed once used.
        results: list[np.ndarray | None] = [None] * len(waves)
        for k, (index, c, gain) in enumerate(items):
            sources, separated[k] = separated[k], None
            if gain != 1.0:
                sources /= gain  # in place: a 1-hour output is hundreds of MB
            if out_rate != self.sample_rate:
                sources = resample(sources, self.sample_rate, out_rate)
                # The input's length at the output rate: through the model rate it is rounded twice.
                sources = _fix_length(sources, resampled_length(shapes[index][1], int(sample_rate), out_rate))
            sources = sources.astype(np.float32, copy=False)
            if self.channels == "mix":
                results[index] = sources  # [S, T]
                continue
            if results[index] is None:  # [S, C, T]
                results[index] = np.empty((sources.shape[0], shapes[index][0], sources.shape[-1]), np.float32)
            results[index][:, c] = sources
        return [as_input_kind(result, device) for result, device in zip(results, devices)]

    def _model_items(self, raw: Any, index: int, sample_rate: int) -> tuple[tuple[int, int], list]:
        """Input ``index`` as ``(its [C, T] shape, [(mono model-rate wave, gain), ...])``: one item downmixed, or
        one per channel. What it makes at the input rate is freed on return."""
        wave = as_channels_first(raw)
        problem = self.fixed_length_error(wave.shape[-1], int(sample_rate))
        if problem is not None:  # before any forward pass
            raise ValueError(f"{problem}; got {wave.shape[-1]} samples at {sample_rate} Hz")
        channels = [to_mono(wave)] if self.channels == "mix" else list(wave)
        if self.channels == "mix" and wave.shape[0] > 1 and channels_cancel(wave, channels[0]):
            # The model would see near silence and put out silent speakers (`mossformer2 separate` fails it).
            warnings.warn(f"input {index + 1}: its channels cancel when mixed down to mono (the mix is over 60 dB "
                          "below the loudest channel): separate each channel instead (channels='each', "
                          "--channels each)", stacklevel=4)
        prepared = []
        for c in range(len(channels)):
            model_wave = resample(channels[c], int(sample_rate), self.sample_rate)
            channels[c] = None  # (the downmix: the input's length at the input rate)
            if model_wave.shape[-1] < self.min_samples:
                raise ValueError(f"audio too short: {wave.shape[-1]} samples at {sample_rate} Hz; the model "
                                 f"needs at least {self.min_samples} samples at {self.sample_rate} Hz")
            prepared.append(self._normalize_level(model_wave))
        return wave.shape, prepared

    def separate_file(self, path: str | Path, out_dir: str | Path, output_rate: int | None = None,
                      format: str | None = None, subtype: str = "PCM_16", plot: bool = False,
                      overwrite: bool = True) -> list[Path]:
        """Separate an audio file and write ``<stem>_s1.<ext>``, ``<stem>_s2.<ext>``, ... into ``out_dir``.

        All outputs appear together or not at all (temp files renamed at the end). ``ext`` is ``format``, else
        the input's own if wav/flac, else wav. ``plot`` adds ``<stem>_spectrogram.png``. Returns the paths.
        Existing outputs are replaced; ``overwrite=False`` raises FileExistsError instead, before separating
        (``mossformer2 separate`` skips such files unless ``--overwrite``).
        A file with nothing to separate (:meth:`nothing_to_separate`) raises ValueError, as ``mossformer2
        separate`` fails it, instead of writing silent speakers. Its warnings are labelled with the file through
        ``warnings.catch_warnings``, which is process-wide: called from several threads at once, some of them are
        lost (``separate`` is thread-safe; so is this method's work, but not its warnings).
        """
        paths = output_paths(path, out_dir, self.num_spks, format)
        if not overwrite:
            existing = [p for p in output_files(paths, plot) if p.exists()]
            if existing:
                raise FileExistsError(f"{path}: {existing[0]} exists (overwrite=True replaces it)")
        wave, sample_rate = read_audio(path)
        problem = self.nothing_to_separate(wave)
        if problem is not None:
            raise ValueError(f"{path}: {problem}")
        if plot:
            from mossformer2.plotting import require_matplotlib

            require_matplotlib()  # before separating, not after
        mixture = (wave, sample_rate) if plot else None
        inputs = [wave]
        del wave  # freed once at the model rate, unless plotted
        with warnings_about(str(path)):
            sources = self.separate_many(inputs, sample_rate, output_rate, release_inputs=True)[0]
        return write_separation(paths, sources, int(output_rate or sample_rate), subtype, plot_mixture=mixture,
                                title=Path(path).name)

    def nothing_to_separate(self, wave: np.ndarray) -> str | None:
        """Why a recording ``[C, T]`` (as ``read_audio`` returns it) holds nothing to separate, else None: all
        silent, or (``channels="mix"``) channels that cancel in the mono downmix, e.g. one wired in reverse
        polarity. ``separate`` returns silent speakers for such input; a file is refused instead."""
        if peak_amplitude(wave) < SILENCE_FLOOR:
            return f"audio is all silent (every sample is zero, or below {SILENCE_FLOOR:.2g}): nothing to separate"
        if self.channels == "mix" and wave.shape[0] > 1 and channels_cancel(wave):
            return ("its channels cancel when mixed down to mono (the mix is over 60 dB below the loudest channel): "
                    "nothing to separate in the mix; separate each channel (channels='each', --channels each)")
        return None

    def _model_length(self, num_samples: int, sample_rate: int) -> int:
        """Samples at the model rate of a recording of ``num_samples`` at ``sample_rate`` (soxr's output length)."""
        return resampled_length(num_samples, int(sample_rate), self.sample_rate)

    def pass_length(self, num_samples: int, sample_rate: int) -> int:
        """Samples (at the model rate) of each forward pass for a recording of ``num_samples`` at ``sample_rate``
        (chunks and windows have one length per recording)."""
        length = self._model_length(num_samples, sample_rate)
        if self.stitching == "clearvoice":
            return clearvoice_pass_length(length, self.sample_rate)
        return min(length, self.chunk)

    def fixed_length_error(self, num_samples: int, sample_rate: int) -> str | None:
        """Why a fixed-length model (an ONNX export without ``--dynamic-length``) cannot separate a recording of
        ``num_samples`` at ``sample_rate``; ``None`` if it can, or if the model takes any length."""
        if self.fixed_length is None or self.pass_length(num_samples, sample_rate) == self.fixed_length:
            return None
        seconds = self.fixed_length / self.sample_rate
        model_length = self._model_length(num_samples, sample_rate)
        if self.shorter_than_fixed_length(num_samples, sample_rate):  # no option helps: no chunk of that length fits
            return (f"the recording ({model_length / self.sample_rate:g} s at {self.sample_rate} Hz) is shorter than "
                    f"the fixed input length the model was exported with ({self.fixed_length} samples, {seconds:g} "
                    "s); export it again with `mossformer2 export --format onnx --dynamic-length` (the default), "
                    "or with a --length-seconds no longer than the shortest recording")
        overlap = _fixed_length_overlap(seconds)
        short = ("; an export this short leaves under 1 s of overlap, where speakers may swap between chunks: "
                 "export a longer --length-seconds" if overlap < SAFE_OVERLAP_SECONDS else "")
        return (f"the model was exported with a fixed input length of {self.fixed_length} samples "
                f"({seconds:g} s at {self.sample_rate} Hz): it separates recordings of that length, or longer ones in "
                f"chunks of exactly that length with an overlap of {overlap:g} s (chunk_seconds={seconds:g}, "
                f"overlap_seconds={overlap:g}: --chunk-seconds {seconds:g} --overlap-seconds {overlap:g}{short}); "
                "export it again with `mossformer2 export --format onnx --dynamic-length` (the default) for any length")

    def shorter_than_fixed_length(self, num_samples: int, sample_rate: int) -> bool:
        """Whether a recording is shorter than a fixed-length model's input (no chunking then helps)."""
        return self.fixed_length is not None and self._model_length(num_samples, sample_rate) < self.fixed_length

    def chunk_count(self, num_samples: int, sample_rate: int) -> int:
        """Forward passes (per channel) a recording of ``num_samples`` at ``sample_rate`` needs."""
        length = self._model_length(num_samples, sample_rate)
        if self.stitching == "clearvoice":
            return clearvoice_window_count(length, self.sample_rate)
        return len(plan_chunks(length, self.chunk, self.overlap))

    # -- internals ---------------------------------------------------------------------------------------------

    def _normalize_level(self, wave: np.ndarray) -> tuple[np.ndarray, float]:
        """Scale the model input; returns (scaled wave, gain) with outputs later divided by gain."""
        peak = peak_amplitude(wave)
        if peak < SILENCE_FLOOR or self.normalize == "none":
            return wave, 1.0
        if self.normalize == "clearvoice":
            return clearvoice_audio_norm(wave), 1.0  # official: the level is not restored for separation
        if self.normalize == "peak":
            gain = TARGET_PEAK / peak
        else:
            # (capped: a lone normal sample among denormals gave 1e40 and more)
            gain = min(TARGET_RMS / float(np.sqrt(mean_square(wave))), MAX_GAIN)
        return np.multiply(wave, gain, dtype=np.float32), gain  # one float32 copy, no float64 or second pass

    def _separate_items(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """Model-rate mono items ``[T_i]`` -> ``[S, T_i]``, batching single-pass items (see ``batch_size``)."""
        results: list[np.ndarray | None] = [None] * len(waves)
        single_pass: list[int] = []
        for i, wave in enumerate(waves):
            if (self.chunk == ONE_PASS and wave.shape[-1] > ONE_PASS_WARN_SECONDS * self.sample_rate
                    and np.any(wave)):
                warnings.warn(f"an input of {wave.shape[-1] / self.sample_rate:.0f} s is separated in one pass "
                              "(chunk_seconds=None): memory grows with its length; chunk_seconds (--chunk-seconds) "
                              "bounds it", stacklevel=4)
            if peak_amplitude(wave) < SILENCE_FLOOR:
                results[i] = np.zeros((self.num_spks, wave.shape[-1]), dtype=np.float32)  # silent channel
            elif self.stitching == "aligned" and wave.shape[-1] <= self.chunk:
                single_pass.append(i)
            else:
                results[i] = self._separate_long(wave)
        lengths = [waves[i].shape[-1] for i in single_pass]
        for batch in make_batches(lengths, self.batch_size, self.pads_batches):
            indices = [single_pass[b] for b in batch]
            sizes = [waves[i].shape[-1] for i in indices]
            padded = np.zeros((len(indices), max(sizes)), dtype=np.float32)
            for row, i in enumerate(indices):
                padded[row, : sizes[row]] = waves[i]
            unequal = min(sizes) != max(sizes)
            outputs = self._separate_pass(padded, np.array(sizes) if unequal else None)
            for i, out, size in zip(indices, outputs, sizes):
                results[i] = out[:, :size]
        return results  # type: ignore[return-value]

    def _separate_long(self, wave: np.ndarray) -> np.ndarray:
        total = (clearvoice_window_count(wave.shape[-1], self.sample_rate) if self.stitching == "clearvoice"
                 else len(plan_chunks(wave.shape[-1], self.chunk, self.overlap)))
        with tqdm(total=total, desc="chunks", unit="chunk", leave=False,
                  disable=True if total < 2 else bar_disabled(self.progress)) as bar:
            if self.stitching == "clearvoice":
                return clearvoice_separate(wave, self._separate_pass, self.sample_rate, batch_size=self.batch_size,
                                           progress=bar.update)
            # Refined outputs sum to their chunk's input, which fixes their polarity: chunks are then only reordered.
            return stitch_aligned(wave, self._separate_pass, self.num_spks, self.chunk, self.overlap,
                                  batch_size=self.batch_size, progress=bar.update, sample_rate=self.sample_rate,
                                  keep_polarity=self.fixes_polarity)


def _check_chunking_options(chunk_seconds: Any, overlap_seconds: Any, stitching: str) -> float:
    """Check ``chunk_seconds`` / ``overlap_seconds`` as numbers of seconds (their order and size in samples:
    ``Separator._chunk_samples``) and warn where they do not serve; returns ``overlap_seconds`` (a given ``None``
    with ``chunk_seconds=None``, as the ``overlap_seconds`` property gives it back then, is the default)."""
    chunked = chunk_seconds is not None
    if chunked and not is_real_number(chunk_seconds):
        raise ValueError(f"chunk_seconds must be a number of seconds or None, got {chunk_seconds!r}")
    if overlap_seconds is None and not chunked:
        overlap_seconds = OVERLAP_SECONDS
    if not is_real_number(overlap_seconds) or not 0 <= overlap_seconds < math.inf:  # (also unused without chunks)
        raise ValueError(f"overlap_seconds (--overlap-seconds) must be a finite number of seconds >= 0, got "
                         f"{overlap_seconds!r}")
    if chunked and not (0 < chunk_seconds < math.inf and 0 <= overlap_seconds < math.inf):
        raise ValueError(f"need finite chunk_seconds > 0 and overlap_seconds >= 0 (--chunk-seconds, "
                         f"--overlap-seconds), got {chunk_seconds} and {overlap_seconds}")
    if chunked and stitching == "aligned" and 0 < overlap_seconds < SAFE_OVERLAP_SECONDS:
        warnings.warn(f"overlap_seconds={overlap_seconds:g} (--overlap-seconds) is under {SAFE_OVERLAP_SECONDS:g} s: "
                      "in inputs longer than a chunk the speakers may swap between chunks (use 1-2 s; default 2)",
                      stacklevel=3)
    if chunked and stitching == "clearvoice" and (chunk_seconds, overlap_seconds) != (CHUNK_SECONDS, OVERLAP_SECONDS):
        warnings.warn("clearvoice stitching runs the official tool's fixed 2 s windows: chunk_seconds and "
                      "overlap_seconds (--chunk-seconds, --overlap-seconds) are not used", stacklevel=3)
    return float(overlap_seconds)


def _check_model(model: Any, backend: str, compile_layers: bool) -> None:
    """ValueError for a model the ``Separator`` cannot run as asked."""
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(f"Separator() takes a model, not a file ({str(model)!r}): Separator.from_pretrained(path) "
                        "loads one (or mossformer2.load_model(path))")
    if not hasattr(model, "config"):
        raise ValueError("the model needs a .config with sample_rate and num_spks (a MossFormer2 or an "
                         "exported model wrapper)")
    is_torch = is_torch_module(model)
    kind = "an ONNX export" if type(model).__name__ == "OnnxRuntimeModel" else f"a {type(model).__name__}"
    if backend == "torch" and not is_torch:
        raise ValueError(f"backend 'torch' (--backend torch) needs a torch model; this one is {kind} (use backend "
                         "'onnxruntime')")
    if backend == "onnxruntime" and is_torch:
        raise ValueError("backend 'onnxruntime' (--backend onnxruntime) needs an exported .onnx model, not a torch "
                         "module")
    if compile_layers and not hasattr(model, "compile_layers"):
        raise ValueError(f"compile_layers (--compile) compiles our MossFormer2 network; this model is {kind}")


def _chosen(requested: bool | None, recommended: bool | None) -> bool:
    """A refinement's switch: as requested, else (``None``) as the checkpoint recommends, else off."""
    return bool(recommended) if requested is None else bool(requested)


def _aligned_channels(channels: list[np.ndarray], inputs: list[np.ndarray], keep_polarity: bool) -> list[np.ndarray]:
    """Each channel's separated speakers ``[S, T]`` in the order of the first non-silent channel's, matched over the
    whole signal (``match_sources``, blind to polarity): the model orders the speakers of each pass by chance, so
    ``_s1`` could hold one person on the left and another on the right. ``inputs`` are the channels ``[T]``.

    Polarity stays as each channel recorded it: a channel wired in reverse, or a spaced microphone's delayed copy
    (weakly anti-correlated with the first), keeps its outputs' sign. With ``keep_polarity`` (refinements that make
    the outputs sum to their input) the sign is right as it is. Otherwise the model's own sign is arbitrary per
    pass, so an output is negated where it relates to its channel's input with the opposite sign to the first
    channel's same speaker. Where that is too weak to tell (a speaker some 20 dB under the other in that channel),
    it is negated where it anti-correlates with the first channel's output of that speaker while the two channels
    correlate (or correlates while they anti-correlate)."""
    first = next((c for c, sources in enumerate(channels) if np.any(sources)), None)
    if first is None:
        return channels
    reference = channels[first]
    reference_signs = correlation_signs(reference, inputs[first])
    aligned = []
    for c, sources in enumerate(channels):
        if c != first and np.any(sources):
            order, matched_signs = match_sources(sources, reference)
            sources = sources[order]  # a copy
            if not keep_polarity:
                signs = correlation_signs(sources, inputs[c]) * reference_signs
                wiring = correlation_signs(inputs[c][None], inputs[first])[0]  # 0: the channels are unrelated
                signs = np.where(signs == 0, matched_signs * wiring, signs)
                sources[signs < 0] *= -1
        aligned.append(sources)
    return aligned


def _refuse_path(value: Any, method: str) -> None:
    if isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{method}() takes audio samples, not a file ({str(value)!r}): separate_file(path, out_dir) "
                        "writes the speakers' files; mossformer2.audio.read_audio(path) gives (samples, sample_rate) "
                        "to pass here")


def _seconds(value: float | None) -> str:
    return "None" if value is None else f"{value:g}"


def _fixed_length_overlap(seconds: float) -> float:
    """The overlap of chunks as long as a fixed-length export of ``seconds``: the default 2 s where the chunk allows
    it, else half the chunk (still >= 1 s from 2 s exports on)."""
    return min(OVERLAP_SECONDS, seconds / 2)


def _fix_length(wave: np.ndarray, length: int) -> np.ndarray:
    """``[..., T]`` cut or zero-padded at the end to ``[..., length]``."""
    if wave.shape[-1] >= length:
        return wave[..., :length]
    return np.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(0, length - wave.shape[-1])])

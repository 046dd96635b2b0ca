"""Long-audio stitching: chunk planning, speaker alignment on overlaps, cross-fades, and the ClearVoice algorithm.

``model_fn`` everywhere is a callable ``[B, L] float32 array -> [B, S, L] float32 array``. NumPy only: the
separation of an exported ONNX model runs without torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
from scipy.optimize import linear_sum_assignment

ModelFn = Callable[[np.ndarray], np.ndarray]


def plan_chunks(total: int, chunk: int, overlap: int) -> list[tuple[int, int]]:
    """``(start, end)`` of equal-length chunks covering ``[0, total)``; consecutive chunks overlap >= ``overlap``.

    The last chunk is shifted back to end at ``total`` so every chunk has length ``min(chunk, total)`` (equal
    lengths batch together and give the model the same context everywhere).
    """
    if chunk <= 0 or not 0 <= overlap < chunk:
        raise ValueError(f"need chunk > overlap >= 0, got chunk={chunk} samples, overlap={overlap} samples")
    if total <= chunk:
        return [(0, total)]
    step = chunk - overlap
    starts = list(range(0, total - chunk, step)) + [total - chunk]
    return [(s, s + chunk) for s in starts]


def crossfade_weights(length: int) -> tuple[np.ndarray, np.ndarray]:
    """Raised-cosine ``(fade_out, fade_in)`` windows of ``length`` samples that sum to exactly 1."""
    fade_in = (np.sin(0.5 * np.pi * (np.arange(length) + 0.5) / length) ** 2).astype(np.float32)
    return (1.0 - fade_in).astype(np.float32), fade_in


def match_sources(estimate: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Speaker order and polarity of ``estimate`` ``[S, n]`` that best match ``reference`` ``[S, n]``.

    Returns ``(order [S], signs [S] of +-1)``: ``signs[:, None] * estimate[order]`` follows the reference. The
    order maximises the summed SI-SDR of the pairs: with zero-mean signals and ``rho`` their correlation
    coefficient, SI-SDR = 10 log10(rho^2 / (1 - rho^2)). SI-SDR training leaves each output's polarity free, so
    two runs of a model may put out x and -x for one speaker: averaging or cross-fading them unmatched would
    cancel that speaker.
    """
    est = estimate - estimate.mean(-1, keepdims=True, dtype=np.float64)
    ref = reference - reference.mean(-1, keepdims=True, dtype=np.float64)
    norms = np.linalg.norm(est, axis=-1)[:, None] * np.linalg.norm(ref, axis=-1)[None, :]
    rho = (est @ ref.T) / np.maximum(norms, 1e-30)  # [S_est, S_ref]; 0 where a signal is silent
    rho2 = np.clip(rho**2, 1e-12, 1.0 - 1e-12)
    rows, cols = linear_sum_assignment(10 * np.log10(rho2 / (1.0 - rho2)), maximize=True)
    order = np.empty(len(cols), dtype=np.int64)
    order[cols] = rows  # estimate rows[i] goes to reference cols[i]
    signs = np.where(rho[order, np.arange(len(order))] >= 0, 1.0, -1.0).astype(np.float32)
    return order, signs


class AlignedStitcher:
    """Fills a preallocated ``[S, T]`` output chunk by chunk, aligning speakers (order and polarity) and
    cross-fading overlaps.

    Chunks must arrive in increasing start order. Memory is the output array plus one chunk.
    """

    def __init__(self, num_spks: int, total: int) -> None:
        self.output = np.zeros((num_spks, total), dtype=np.float32)
        self._end = 0  # samples written so far

    def add(self, start: int, chunk_out: np.ndarray) -> None:
        """Merge a chunk's separated sources ``[S, L]`` covering ``[start, start + L)``."""
        end = start + chunk_out.shape[-1]
        if start > self._end:
            raise ValueError(f"chunk at {start} leaves a gap after {self._end}")
        overlap = self._end - start
        if overlap > 0:
            written = self.output[:, start:self._end]
            # A model may flip a speaker's polarity from one chunk to the next, as well as the order.
            order, signs = match_sources(chunk_out[:, :overlap], written)
            chunk_out = chunk_out[order] if (signs > 0).all() else chunk_out[order] * signs[:, None]
            fade_out, fade_in = crossfade_weights(overlap)
            written *= fade_out
            written += fade_in * chunk_out[:, :overlap]
        self.output[:, self._end:end] = chunk_out[:, overlap:]
        self._end = max(self._end, end)


def batched(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def stitch_aligned(wave: np.ndarray, model_fn: ModelFn, num_spks: int, chunk: int, overlap: int,
                   batch_size: int = 1, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Separate ``wave`` ``[T]`` chunk by chunk: ``[S, T]``. Equal-length chunks run ``batch_size`` at a time.

    ``progress(n)`` is called after each batch with the number of chunks done in it.
    """
    plan = plan_chunks(wave.shape[-1], chunk, overlap)
    stitcher = AlignedStitcher(num_spks, wave.shape[-1])
    for group in batched(plan, max(1, batch_size)):
        outputs = model_fn(np.stack([wave[s:e] for s, e in group]))  # [B, S, L]
        for (start, _), out in zip(group, outputs):
            stitcher.add(start, out)
        if progress is not None:
            progress(len(group))
    return stitcher.output


# ------------------------------------------------------------------------------------------------------------
# ClearVoice (official MossFormer2_SS_16K path-mode decoding: decode_one_audio_mossformer2_ss_16k)


def _clearvoice_window(sample_rate: int, decode_window: float) -> tuple[int, int]:
    """(window, stride) in samples of the official decoding: windows of ``decode_window`` s at stride 0.75 W."""
    window = int(sample_rate * decode_window)
    return window, int(0.75 * window)


def clearvoice_padded_length(total: int, window: int, stride: int) -> int:
    """Length after the official zero-padding rule (more than needed in the last case: W + remainder)."""
    if total < window:
        return window
    if total < window + stride:
        return window + stride
    remainder = (total - window) % stride
    if remainder:
        return total + total - ((total - window) // stride) * stride
    return total


def clearvoice_separate(wave: np.ndarray, model_fn: ModelFn, sample_rate: int = 16000, decode_window: float = 2.0,
                        one_time_decode_length: float = 2.0, batch_size: int = 1,
                        progress: Callable[[int], None] | None = None) -> np.ndarray:
    """``decode_one_audio_mossformer2_ss_16k`` (path mode) on ``wave`` ``[T]`` -> ``[S, T]``.

    Windows of ``decode_window`` s at stride 0.75 W, give-up (W - stride) // 2 at each side, tiled without
    cross-fade or speaker alignment; outputs RMS-matched to the input over the padded length, then cut to T.
    Windows are independent forwards, so running ``batch_size`` of them at once gives the same result.
    """
    total = wave.shape[-1]
    window, stride = _clearvoice_window(sample_rate, decode_window)
    give_up = (window - stride) // 2
    rms_in = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
    padded = np.zeros(clearvoice_padded_length(total, window, stride), dtype=np.float32)
    padded[:total] = wave
    if total > sample_rate * one_time_decode_length:
        starts = list(range(0, padded.shape[-1] - window + 1, stride))
        out: np.ndarray | None = None
        for group in batched(starts, max(1, batch_size)):
            segs = model_fn(np.stack([padded[s:s + window] for s in group]))
            if out is None:
                out = np.zeros((segs.shape[1], padded.shape[-1]), dtype=np.float32)
            for start, seg in zip(group, segs):
                if start == 0:
                    out[:, :window - give_up] = seg[:, :window - give_up]
                else:
                    out[:, start + give_up:start + window - give_up] = seg[:, give_up:window - give_up]
            if progress is not None:
                progress(len(group))
        assert out is not None
    else:
        out = model_fn(padded[None])[0]
        if progress is not None:
            progress(1)
    # RMS over the padded length, no epsilon (official); a silent output stays silent instead of NaN.
    rms_out = np.sqrt(np.mean(np.square(out, dtype=np.float64), axis=-1, keepdims=True))
    scale = np.divide(rms_in, rms_out, out=np.zeros_like(rms_out), where=rms_out > 0)
    return (out * scale).astype(np.float32)[:, :total]


def clearvoice_window_count(total: int, sample_rate: int = 16000, decode_window: float = 2.0,
                            one_time_decode_length: float = 2.0) -> int:
    """Forward passes ``clearvoice_separate`` makes for ``total`` samples."""
    window, stride = _clearvoice_window(sample_rate, decode_window)
    if total <= sample_rate * one_time_decode_length:
        return 1
    return (clearvoice_padded_length(total, window, stride) - window) // stride + 1


def clearvoice_pass_length(total: int, sample_rate: int = 16000, decode_window: float = 2.0,
                           one_time_decode_length: float = 2.0) -> int:
    """Samples of each forward pass ``clearvoice_separate`` makes for ``total`` samples."""
    window, stride = _clearvoice_window(sample_rate, decode_window)
    if total <= sample_rate * one_time_decode_length:
        return clearvoice_padded_length(total, window, stride)  # one pass over the padded input
    return window


def clearvoice_audio_norm(wave: np.ndarray) -> np.ndarray:
    """Official ``audio_norm``: RMS to -25 dBFS, then the RMS of above-mean-power samples to -25 dBFS."""
    x = wave.astype(np.float64)
    target = 10 ** (-25 / 20)
    x = x * (target / (math.sqrt(np.mean(x**2)) + 1e-6))
    power = x**2
    loud = power[power > power.mean()]
    rms_loud = math.sqrt(loud.mean()) if loud.size else 0.0
    x = x * (target / (rms_loud + 1e-6))
    return x.astype(np.float32)


__all__ = ["AlignedStitcher", "clearvoice_audio_norm", "clearvoice_padded_length", "clearvoice_pass_length",
           "clearvoice_separate", "clearvoice_window_count", "crossfade_weights", "match_sources", "plan_chunks",
           "stitch_aligned"]

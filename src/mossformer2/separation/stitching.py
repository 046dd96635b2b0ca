"""Long-audio stitching: chunk planning, speaker alignment on overlaps, cross-fades, and the ClearVoice algorithm.

``model_fn`` everywhere is a callable ``[B, L] float32 array -> [B, S, L] float32 array``. NumPy only: the
separation of an exported ONNX model runs without torch.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Callable, Iterator

import numpy as np
from scipy.optimize import linear_sum_assignment

from mossformer2.audio import mean_square

ModelFn = Callable[[np.ndarray], np.ndarray]

log = logging.getLogger(__name__)

TARGET_RMS = 10 ** (-25 / 20)  # -25 dBFS: the level ClearVoice's audio_norm sets, i.e. what the model was fed

# An overlap decides the speaker order when its best order beats the next best by this much summed SI-SDR (dB).
# A decisive overlap (both speakers talk in it) wins by tens of dB; one where only one speaker talks (the model
# then puts that voice into every output) or nobody does wins by a fraction of a dB, i.e. by chance.
DECISIVE_MARGIN_DB = 3.0
# The voices overrule an undecided overlap only when they are this clear (summed dB distance of the voice profiles):
# on 33 undecided boundaries of turn-taking conversations of the validation speakers, weaker voice evidence was
# right no more often than the overlap's guess (17 vs 20), while every decision at >= 10 dB agreed with the truth.
VOICE_DECISIVE_DB = 10.0
SILENCE_PEAK = 1e-4  # -80 dBFS: a chunk this quiet holds no voice whose order could be wrong (at the model's level)
# A chunk's output is negated to follow the stitched one only on clear evidence: a correlation at least this
# negative over an overlap that is not silent. A real flip of a voice correlates near -1; a near-silent overlap
# (a DC offset in a pause) gave +-0.03 and +-0.9 alike, and a flip there inverted the rest of the file.
FLIP_MIN_ANTICORRELATION = 0.5
# --channels each: a speaker's output correlates with its own channel's input by about its share of the level
# (0.3 at -10 dB, 0.1 at -20 dB); weaker correlations say nothing about its sign.
POLARITY_MIN_CORRELATION = 0.1


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


def _pair_si_sdr(estimate: np.ndarray, reference: np.ndarray,
                 block: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """``(si_sdr [S_est, S_ref] in dB, rho [S_est, S_ref])`` of every estimate / reference pair (zero-mean).

    Sums are taken in float64 over blocks of ``block`` samples, so whole hour-long signals (aligning the
    channels of a file) need no full-length float64 copies.
    """
    num = estimate.shape[-1]
    sum_e, sum_r = np.zeros(estimate.shape[0]), np.zeros(reference.shape[0])
    energy_e, energy_r = np.zeros_like(sum_e), np.zeros_like(sum_r)
    cross = np.zeros((estimate.shape[0], reference.shape[0]))
    for i in range(0, num, block):
        est, ref = estimate[:, i:i + block].astype(np.float64), reference[:, i:i + block].astype(np.float64)
        sum_e += est.sum(-1)
        sum_r += ref.sum(-1)
        energy_e += np.einsum("sn,sn->s", est, est)
        energy_r += np.einsum("sn,sn->s", ref, ref)
        cross += est @ ref.T
    mean_e, mean_r = sum_e / max(num, 1), sum_r / max(num, 1)
    covariance = cross - num * mean_e[:, None] * mean_r[None, :]
    var_e = np.maximum(energy_e - num * mean_e**2, 0.0)
    var_r = np.maximum(energy_r - num * mean_r**2, 0.0)
    rho = covariance / np.maximum(np.sqrt(var_e[:, None] * var_r[None, :]), 1e-30)  # 0 where a signal is silent
    rho2 = np.clip(rho**2, 1e-12, 1.0 - 1e-12)
    return 10 * np.log10(rho2 / (1.0 - rho2)), rho


def _best_order(score: np.ndarray, maximize: bool = True) -> np.ndarray:
    """``order [S]``: estimate ``order[j]`` goes to reference ``j``, optimising the summed ``score[est, ref]``."""
    rows, cols = linear_sum_assignment(score, maximize=maximize)
    order = np.empty(len(cols), dtype=np.int64)
    order[cols] = rows
    return order


def _runner_up_gap(score: np.ndarray, order: np.ndarray, maximize: bool = True) -> float:
    """How much ``order`` beats every other order on the summed ``score`` (inf beyond 5 speakers: 120 orders)."""
    num = len(order)
    if num > 5:
        return math.inf
    columns = np.arange(num)
    best = float(score[order, columns].sum())
    others = [float(score[list(perm), columns].sum()) for perm in itertools.permutations(range(num))
              if list(perm) != list(order)]
    if not others:
        return math.inf
    return best - max(others) if maximize else min(others) - best


def correlation_signs(signals: np.ndarray, mixture: np.ndarray) -> np.ndarray:
    """``[S]``: +1 / -1 where each of ``signals`` ``[S, T]`` correlates clearly positively / negatively with
    ``mixture`` ``[T]`` (zero-mean), 0 where the correlation is too weak to tell (``POLARITY_MIN_CORRELATION``)."""
    rho = _pair_si_sdr(signals, mixture[None])[1][:, 0]
    return np.where(np.abs(rho) >= POLARITY_MIN_CORRELATION, np.sign(rho), 0.0)


def match_sources(estimate: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Speaker order and polarity of ``estimate`` ``[S, n]`` that best match ``reference`` ``[S, n]``.

    Returns ``(order [S], signs [S] of +-1)``: ``signs[:, None] * estimate[order]`` follows the reference. The
    order maximises the summed SI-SDR of the pairs: with zero-mean signals and ``rho`` their correlation
    coefficient, SI-SDR = 10 log10(rho^2 / (1 - rho^2)). SI-SDR training leaves each output's polarity free, so
    two runs of a model may put out x and -x for one speaker: averaging or cross-fading them unmatched would
    cancel that speaker.
    """
    order, rho, _ = _match(estimate, reference)
    return order, _signs(rho, order)


def match_sources_with_margin(estimate: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`match_sources` plus how sure it is: the summed-SI-SDR lead (dB) of the chosen order over the next."""
    order, rho, score = _match(estimate, reference)
    return order, _signs(rho, order), _runner_up_gap(score, order)


def _match(estimate: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, rho, si_sdr)``: the order maximising the summed pair SI-SDR, and the pair matrices it came from."""
    score, rho = _pair_si_sdr(estimate, reference)
    return _best_order(score), rho, score


def _signs(rho: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``[S]`` +-1: the polarity that makes estimate ``order[j]`` correlate positively with reference ``j``."""
    return np.where(rho[order, np.arange(len(order))] >= 0, 1.0, -1.0).astype(np.float32)


class VoiceProfiles:
    """Long-term spectral envelope of each output's voice, from frames where that output clearly dominates.

    When a chunk overlap cannot decide the speaker order (one voice in every output, or silence), the voices
    can: each output's average log spectrum (level removed) is compared with what each stitched output held so
    far. Frames where outputs have similar energy (the model duplicating one voice) are left out.
    """

    FRAME = 512  # 32 ms at 16 kHz
    BANDS = 24  # log-spaced, like a coarse mel scale
    DOMINANCE_DB = 6.0  # an output's frame counts when it is this much louder than every other output
    ACTIVE_DB = 45.0  # ... and within this range of the loudest frame seen so far, and above -80 dBFS
    MIN_FRAMES = 8  # about 0.25 s of clear speech before a profile is trusted

    def __init__(self, num_spks: int, silence_peak: float = SILENCE_PEAK) -> None:
        self.silence_db = 20 * math.log10(silence_peak)
        edges = np.unique(np.geomspace(2, self.FRAME // 2 + 1, self.BANDS + 1).astype(np.int64))
        self._edges = edges
        self._window = np.hanning(self.FRAME).astype(np.float32)
        self.sums = np.zeros((num_spks, len(edges) - 1))
        self.counts = np.zeros(num_spks, dtype=np.int64)
        self._loudest = -np.inf  # dB, the loudest frame seen so far: pauses and room noise stay out of the profiles

    def measure(self, sources: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(sums [S, bands], counts [S])`` of level-free log band spectra over each output's dominant frames.

        Frame energies come from the time domain; only the dominant frames are transformed (memory stays a
        fraction of one chunk).
        """
        num_spks, length = sources.shape
        frames = length // self.FRAME
        sums, counts = np.zeros_like(self.sums), np.zeros_like(self.counts)
        if frames == 0:
            return sums, counts
        framed = sources[:, :frames * self.FRAME].reshape(num_spks, frames, self.FRAME)  # a view
        weights = np.square(self._window)
        energy = np.stack([10 * np.log10(np.einsum("fn,fn,n->f", framed[spk], framed[spk], weights)
                                         / weights.sum() + 1e-20)
                           for spk in range(num_spks)])  # [S, F] dB of the windowed mean square
        self._loudest = max(self._loudest, float(energy.max()))
        floor = max(self._loudest - self.ACTIVE_DB, self.silence_db)
        for spk in range(num_spks):
            others = np.delete(energy, spk, axis=0).max(axis=0) if num_spks > 1 else np.full(frames, -np.inf)
            clear = np.flatnonzero((energy[spk] - others >= self.DOMINANCE_DB)
                                   & (energy[spk] >= floor))
            if clear.size == 0:
                continue
            spectrum = np.fft.rfft(framed[spk, clear] * self._window, axis=-1)
            power = np.square(spectrum.real) + np.square(spectrum.imag)
            bands = np.add.reduceat(power, self._edges[:-1], axis=-1)[:, :len(self._edges) - 1]
            shapes = 10 * np.log10(bands.astype(np.float64) + 1e-12)
            sums[spk] = (shapes - shapes.mean(-1, keepdims=True)).sum(0)
            counts[spk] = clear.size
        return sums, counts

    def add(self, sources: np.ndarray) -> None:
        """Add the (already aligned) ``sources`` ``[S, L]`` to each output's profile."""
        sums, counts = self.measure(sources)
        self.sums += sums
        self.counts += counts

    def order(self, sources: np.ndarray) -> tuple[np.ndarray, float] | None:
        """The order of ``sources`` ``[S, L]`` whose voices best match the profiles so far and its lead (mean dB
        distance), or None when too few clear frames exist on either side to compare anything."""
        sums, counts = self.measure(sources)
        known_new, known_old = counts >= self.MIN_FRAMES, self.counts >= self.MIN_FRAMES
        if not known_new.any() or not known_old.any():
            return None
        new = sums / np.maximum(counts, 1)[:, None]
        old = self.sums / np.maximum(self.counts, 1)[:, None]
        distance = np.sqrt(((new[:, None, :] - old[None, :, :]) ** 2).mean(-1))  # [S_new, S_old], dB
        # A voice without a profile on one side adds the same to every order: it cannot sway the choice.
        distance[~known_new, :] = 0.0
        distance[:, ~known_old] = 0.0
        order = _best_order(distance, maximize=False)
        return order, _runner_up_gap(distance, order, maximize=False)


class AlignedStitcher:
    """Fills a preallocated ``[S, T]`` output chunk by chunk, aligning speakers (order and polarity) and
    cross-fading overlaps.

    The overlap with the previous chunk decides the order when it is clear (both voices talk in it). When it is
    not (one voice, which the model then puts into every output, or silence), the voices decide if they clearly
    can (``VOICE_DECISIVE_DB``): each output's spectral profile so far against the new chunk's outputs
    (:class:`VoiceProfiles`); if neither can, the overlap's guess stands and ``uncertain`` records where (in
    silence, that keeps the model's own output order). Chunks must arrive in increasing start order.
    Memory is the output array plus one chunk.

    ``keep_polarity``: never negate a chunk's outputs, only reorder them: right when each chunk's outputs sum to
    that chunk's input (the Wiener filter, mixture consistency), which already fixes their polarity.
    ``silence_peak``: outputs under this peak hold no voice (:func:`silence_peak_for` scales it to the input).
    """

    def __init__(self, num_spks: int, total: int, sample_rate: int | None = None,
                 keep_polarity: bool = False, silence_peak: float = SILENCE_PEAK) -> None:
        self.output = np.zeros((num_spks, total), dtype=np.float32)
        self.silence_peak = silence_peak
        self.profiles = VoiceProfiles(num_spks, silence_peak)
        self.sample_rate = sample_rate
        self.keep_polarity = keep_polarity
        self.uncertain: list[int] = []  # chunk starts (samples) whose speaker order was a guess
        self._end = 0  # samples written so far
        self._heard = False  # whether any output so far holds sound: before that, no order can be wrong

    def add(self, start: int, chunk_out: np.ndarray) -> None:
        """Merge a chunk's separated sources ``[S, L]`` covering ``[start, start + L)``."""
        end = start + chunk_out.shape[-1]
        if start > self._end:
            raise ValueError(f"chunk at {start} leaves a gap after {self._end}")
        overlap = self._end - start
        if overlap > 0:
            written = self.output[:, start:self._end]
            # A model may flip a speaker's polarity from one chunk to the next, as well as the order.
            order, signs = self._align(start, chunk_out, written)
            chunk_out = chunk_out[order] if (signs > 0).all() else chunk_out[order] * signs[:, None]
            fade_out, fade_in = crossfade_weights(overlap)
            written *= fade_out
            written += fade_in * chunk_out[:, :overlap]
        self.output[:, self._end:end] = chunk_out[:, overlap:]
        self.profiles.add(chunk_out[:, overlap:])
        self._end = max(self._end, end)
        self._heard = self._heard or bool(np.abs(chunk_out).max() >= self.silence_peak)

    def _evidenced_signs(self, rho: np.ndarray, order: np.ndarray, written: np.ndarray) -> np.ndarray:
        """:func:`_signs`, keeping the model's own polarity where the overlap gives no clear reason to flip (or
        ``keep_polarity``). Silence is judged without the mean: a DC offset in a pause is no voice."""
        if self.keep_polarity:
            return np.ones(len(order), dtype=np.float32)
        signs = _signs(rho, order)
        weak = rho[order, np.arange(len(order))] > -FLIP_MIN_ANTICORRELATION
        silent = np.abs(written - written.mean(axis=-1, keepdims=True)).max(axis=-1) < self.silence_peak
        signs[weak | silent] = 1.0
        return signs

    def _align(self, start: int, chunk_out: np.ndarray, written: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order, rho, score = _match(chunk_out[:, :written.shape[-1]], written)
        margin = _runner_up_gap(score, order)
        if margin >= DECISIVE_MARGIN_DB:
            return order, self._evidenced_signs(rho, order, written)
        by_voice = self.profiles.order(chunk_out)
        if by_voice is None or by_voice[1] < VOICE_DECISIVE_DB:
            # In a silent chunk, or after nothing but silence, the order cannot matter yet.
            if self._heard and np.abs(chunk_out).max() >= self.silence_peak:
                self.uncertain.append(start)
            log.debug("speaker order at %s: neither the overlap (lead %.2f dB) nor the voices decide it",
                      self._where(start), margin)
            return order, self._evidenced_signs(rho, order, written)
        log.debug("speaker order at %s set by the voices (lead %.2f dB; the overlap's lead was %.2f dB)",
                  self._where(start), by_voice[1], margin)
        return by_voice[0], self._evidenced_signs(rho, by_voice[0], written)

    def _where(self, start: int) -> str:
        return f"{start / self.sample_rate:.1f} s" if self.sample_rate else f"sample {start}"


def batched(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def silence_peak_for(wave: np.ndarray) -> float:
    """The stitcher's silence level for an input ``[T]``: ``SILENCE_PEAK`` (-80 dBFS) at the level the model is fed
    (-25 dBFS RMS), lowered with a quieter input (``normalize="none"``): at 1e-5 peak every output fell under the
    absolute level, so no chunk's polarity flip was undone and no guessed order was reported."""
    rms = math.sqrt(float(mean_square(wave)))
    return max(SILENCE_PEAK * min(1.0, rms / TARGET_RMS), 1e-30)  # silence: a level above 0 (its log is taken)


def stitch_aligned(wave: np.ndarray, model_fn: ModelFn, num_spks: int, chunk: int, overlap: int,
                   batch_size: int = 1, progress: Callable[[int], None] | None = None,
                   sample_rate: int | None = None, keep_polarity: bool = False) -> np.ndarray:
    """Separate ``wave`` ``[T]`` chunk by chunk: ``[S, T]``. Equal-length chunks run ``batch_size`` at a time.

    ``progress(n)`` is called after each batch with the number of chunks done in it. Chunk boundaries whose
    speaker order neither the overlap nor the voices could decide are named in one ``UserWarning``
    (``sample_rate`` puts them in seconds). ``keep_polarity``: see :class:`AlignedStitcher`.
    """
    plan = plan_chunks(wave.shape[-1], chunk, overlap)
    stitcher = AlignedStitcher(num_spks, wave.shape[-1], sample_rate, keep_polarity, silence_peak_for(wave))
    for group in batched(plan, max(1, batch_size)):
        outputs = model_fn(np.stack([wave[s:e] for s, e in group]))  # [B, S, L]
        for (start, _), out in zip(group, outputs):
            stitcher.add(start, out)
        if progress is not None:
            progress(len(group))
    if stitcher.uncertain:
        where = ", ".join(stitcher._where(s) for s in stitcher.uncertain[:5])
        more = f" and {len(stitcher.uncertain) - 5} more" if len(stitcher.uncertain) > 5 else ""
        count = len(stitcher.uncertain)
        warnings.warn(f"the speaker order at {count} chunk boundar{'y' if count == 1 else 'ies'} ({where}{more}) "
                      "was a guess: only one voice or silence in the overlap, and the voices heard so far did not "
                      "clearly tell them apart; the speakers may swap there (a longer overlap or chunk helps: "
                      "overlap_seconds / chunk_seconds, --overlap-seconds / --chunk-seconds)", stacklevel=2)
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
    rms_in = float(np.sqrt(mean_square(wave)))
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
    rms_out = np.sqrt(mean_square(out))
    scale = np.divide(rms_in, rms_out, out=np.zeros_like(rms_out), where=rms_out > 0)
    out = out[:, :total] if out.flags.writeable else out[:, :total].copy()  # (a model's output may be read-only)
    # in place, computed in float64 as before (numpy buffers the cast: no float64 copy of the whole output)
    return np.multiply(out, scale[:, None], out=out, casting="unsafe")


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
    target = TARGET_RMS
    x = x * (target / (math.sqrt(np.mean(x**2)) + 1e-6))
    power = x**2
    loud = power[power > power.mean()]
    rms_loud = math.sqrt(loud.mean()) if loud.size else 0.0
    x = x * (target / (rms_loud + 1e-6))
    return x.astype(np.float32)


__all__ = ["DECISIVE_MARGIN_DB", "TARGET_RMS", "VOICE_DECISIVE_DB", "AlignedStitcher", "VoiceProfiles",
           "clearvoice_audio_norm", "clearvoice_padded_length", "clearvoice_pass_length", "clearvoice_separate",
           "clearvoice_window_count", "crossfade_weights", "match_sources", "match_sources_with_margin", "plan_chunks",
           "stitch_aligned"]

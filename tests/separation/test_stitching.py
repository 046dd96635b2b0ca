"""Chunk planning, cross-fades, speaker alignment with an oracle separator, and the ClearVoice algorithm."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch

from mossformer2.losses import pairwise_si_sdr
from mossformer2.separation import Separator
from mossformer2.separation.separator import TARGET_RMS
from mossformer2.separation.stitching import (
    SILENCE_PEAK,
    AlignedStitcher,
    VoiceProfiles,
    _pair_si_sdr,
    clearvoice_audio_norm,
    clearvoice_padded_length,
    clearvoice_separate,
    clearvoice_window_count,
    crossfade_weights,
    match_sources,
    plan_chunks,
    silence_peak_for,
    stitch_aligned,
)

SR = 16000


def speech_like_sources(num_spks: int, seconds: float, seed: int = 0) -> np.ndarray:
    """``[S, T]`` band-limited noise bursts with syllable-rate envelopes and pauses, different per speaker."""
    rng = np.random.default_rng(seed)
    T = int(seconds * SR)
    t = np.arange(T) / SR
    sources = []
    for k in range(num_spks):
        noise = np.convolve(rng.standard_normal(T), np.hanning(8 + 6 * k), mode="same")
        tone = np.sin(2 * np.pi * (120 + 70 * k) * t + rng.uniform(0, 6))
        envelope = np.clip(np.sin(2 * np.pi * (3 + k) * t + rng.uniform(0, 6)), 0, None) ** 2
        pauses = (np.sin(2 * np.pi * 0.21 * (k + 1) * t + k) > -0.7).astype(float)
        s = (0.6 * noise / noise.std() + tone) * (0.1 + envelope) * pauses
        sources.append(0.1 * s / s.std())
    return np.stack(sources).astype(np.float32)


def pair_scores(est: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """SI-SDR of every estimate against every reference: ``[S_est, S_ref]``."""
    return pairwise_si_sdr(torch.from_numpy(est)[None].double(), torch.from_numpy(ref)[None].double())[0].numpy()


class OracleModel:
    """Stand-in separator: finds each chunk in the mixture and returns the true sources in a random order."""

    def __init__(self, mixture: np.ndarray, sources: np.ndarray, seed: int = 1, atol: float = 0.0,
                 flip_signs: bool = False) -> None:
        self.mixture, self.sources, self.atol, self.flip_signs = mixture, sources, atol, flip_signs
        self.config = types.SimpleNamespace(sample_rate=SR, num_spks=sources.shape[0], encoder_kernel_size=16)
        self.rng = np.random.default_rng(seed)
        self.calls: list[tuple[int, int]] = []  # (batch, length)
        self.permutations: set[tuple[int, ...]] = set()

    def _locate(self, chunk: np.ndarray) -> int:
        anchor = int(np.argmax(np.abs(chunk) > 0.01))  # a loud sample: silence would match everywhere
        for start in np.flatnonzero(np.abs(self.mixture - chunk[anchor]) <= self.atol) - anchor:
            candidate = self.mixture[start:start + chunk.shape[-1]]
            if candidate.shape == chunk.shape and np.allclose(candidate, chunk, rtol=0, atol=self.atol):
                return int(start)
        raise AssertionError("chunk not found in the mixture")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(tuple(batch.shape))
        outs = []
        for chunk in batch:
            start = self._locate(chunk)
            order = tuple(self.rng.permutation(self.sources.shape[0]))
            self.permutations.add(order)
            out = self.sources[list(order), start:start + chunk.shape[-1]]
            if self.flip_signs:  # SI-SDR-trained models may put a speaker out with either polarity
                out = out * self.rng.choice([-1.0, 1.0], size=(out.shape[0], 1)).astype(np.float32)
            outs.append(out)
        return np.stack(outs)


def test_plan_chunks_cover_with_equal_lengths():
    for total, chunk, overlap in [(100, 30, 10), (95, 30, 5), (31, 30, 10), (1000, 160, 40), (30, 30, 10)]:
        plan = plan_chunks(total, chunk, overlap)
        assert plan[0][0] == 0 and plan[-1][1] == total
        assert all(e - s == min(chunk, total) for s, e in plan)
        for (s0, e0), (s1, _) in zip(plan, plan[1:]):
            assert s0 < s1 and e0 - s1 >= overlap  # overlap at least as asked, no gap
    assert plan_chunks(10, 30, 10) == [(0, 10)]
    assert len(plan_chunks(1000, 160, 40)) == 8  # ceil((1000 - 160) / 120) + 1
    for bad in [(100, 0, 0), (100, 30, 30), (100, 30, -1)]:
        with pytest.raises(ValueError):
            plan_chunks(*bad)


def test_crossfade_windows_sum_to_one():
    fade_out, fade_in = crossfade_weights(257)
    np.testing.assert_allclose(fade_out + fade_in, 1.0, atol=1e-7)
    assert np.all(np.diff(fade_in) > 0) and fade_in[0] < 0.01 and fade_in[-1] > 0.99


def test_stitcher_reconstructs_identical_chunks_exactly():
    signal = np.random.default_rng(0).standard_normal((2, 500)).astype(np.float32)
    stitcher = AlignedStitcher(2, 500)
    swapped = 0
    for index, (start, end) in enumerate(plan_chunks(500, 120, 40)):
        swapped += index % 2
        stitcher.add(start, signal[::-1, start:end] if index % 2 else signal[:, start:end])  # every other swapped
    assert swapped >= 2
    np.testing.assert_allclose(stitcher.output, signal, atol=1e-6)
    with pytest.raises(ValueError, match="gap"):
        AlignedStitcher(2, 500).add(10, signal[:, 10:50])


@pytest.mark.parametrize("num_spks,batch_size", [(2, 1), (2, 3), (3, 2)])
def test_oracle_chunks_in_random_order_are_stitched_without_swaps(num_spks, batch_size):
    sources = speech_like_sources(num_spks, 20.0, seed=num_spks)
    mixture = sources.sum(0)
    oracle = OracleModel(mixture, sources, seed=batch_size)
    sep = Separator(oracle, chunk_seconds=2.0, overlap_seconds=0.5, normalize="none", batch_size=batch_size)
    out = sep.separate(mixture, SR)
    assert out.shape == sources.shape
    assert len(oracle.permutations) > 1  # the oracle really did shuffle speakers
    assert all(length <= 2 * SR for _, length in oracle.calls)  # never the whole file at once
    assert max(b for b, _ in oracle.calls) == batch_size
    # Global speaker order is arbitrary; find it once, then every speaker must match everywhere.
    scores = pair_scores(out, sources)
    order = scores.argmax(axis=1)
    assert sorted(order) == list(range(num_spks))
    assert scores[np.arange(num_spks), order].min() >= 40.0
    checked = 0
    for start in range(0, mixture.shape[-1] - SR, SR // 2):  # no swap in any 0.5 s segment with all speakers
        seg = slice(start, start + SR // 2)
        if np.abs(sources[:, seg]).max(axis=1).min() > 0:
            assert list(pair_scores(out[:, seg], sources[:, seg]).argmax(1)) == list(order)
            checked += 1
    assert checked > 10


@pytest.mark.parametrize("scale", [1.0, 1e-4])  # 1e-4: a quiet recording under normalize="none" (-80 dBFS peak)
def test_speakers_whose_polarity_flips_between_chunks_are_stitched_without_cancelling(scale):
    sources = speech_like_sources(2, 12.0, seed=3) * np.float32(scale)
    mixture = sources.sum(0)
    oracle = OracleModel(mixture, sources, seed=4, flip_signs=True)
    out = Separator(oracle, chunk_seconds=2.0, overlap_seconds=0.5, normalize="none").separate(mixture, SR)
    scores = pair_scores(out, sources)
    order = scores.argmax(axis=1)
    assert sorted(order) == [0, 1]
    # Each speaker equals its source up to a sign that may change only where the speaker is silent across a
    # whole overlap (nothing to align on, nothing to hear). Cross-fading a flipped chunk into an unflipped one
    # would instead leave (fade_in - fade_out) * x there: a hole in the middle of the overlap.
    for k, ref in enumerate(order):
        np.testing.assert_allclose(np.abs(out[k]), np.abs(sources[ref]), atol=1e-5 * scale)


def test_a_near_silent_overlap_never_inverts_the_outputs_that_follow():
    """A pause holding a tiny DC offset gives an overlap whose correlations mean nothing (rho +-0.9 or +-0.03 at
    random): the next chunk keeps its own polarity there instead of being negated, which had inverted the rest of
    a file (outputs summing to minus the input). A clear flip over a voiced overlap is still undone."""
    n, overlap = 4000, 1000
    rng = np.random.default_rng(0)
    voice = (0.1 * rng.standard_normal((2, n))).astype(np.float32)
    pause = np.full((2, n), 5e-8, dtype=np.float32)  # the stitched outputs: a DC offset far below SILENCE_PEAK
    pause[1] += 1e-9 * rng.standard_normal(n).astype(np.float32)
    stitcher = AlignedStitcher(2, 2 * n - overlap)
    stitcher.add(0, pause)
    second = -pause[:, n - overlap:].copy()  # the model's output for the next chunk: the offset, negated
    second = np.concatenate([second, np.full((2, n - overlap), -5e-8, dtype=np.float32)], axis=1)
    second[:, overlap:] += voice[:, : n - overlap]  # ... and then voices
    stitcher.add(n - overlap, second)
    np.testing.assert_array_equal(stitcher.output[:, n:], second[:, overlap:])  # not negated
    flipped = AlignedStitcher(2, 2 * n - overlap)  # a voiced overlap with a real flip of speaker 2
    flipped.add(0, voice)
    chunk = voice[:, n - overlap:].copy()
    chunk = np.concatenate([chunk, voice[:, : n - overlap]], axis=1)
    chunk[1] *= -1
    flipped.add(n - overlap, chunk)
    np.testing.assert_array_equal(flipped.output[1, n:], -chunk[1, overlap:])
    # a pause with a realistic DC offset (-50 dBFS, far above SILENCE_PEAK) is silence too: the mean is no voice
    offset = AlignedStitcher(2, 2 * n - overlap)
    offset.add(0, pause + np.float32(3e-3))
    dc_chunk = second - np.float32(3e-3)
    offset.add(n - overlap, dc_chunk)
    np.testing.assert_array_equal(offset.output[:, n:], dc_chunk[:, overlap:])
    # keep_polarity (outputs that sum to their chunk's input): reordered, never negated
    kept = AlignedStitcher(2, 2 * n - overlap, keep_polarity=True)
    kept.add(0, voice)
    kept.add(n - overlap, chunk[::-1].copy())
    np.testing.assert_array_equal(kept.output[:, n:], chunk[:, overlap:])  # speaker 2 stays as the model put it


def test_oracle_under_rms_normalisation_stays_aligned_and_keeps_level():
    sources = speech_like_sources(2, 12.0, seed=5)
    mixture = sources.sum(0)
    gain = np.float32(TARGET_RMS / np.sqrt(np.mean(mixture.astype(np.float64) ** 2)))

    class ScaledOracle(OracleModel):
        """Sees the normalised chunk: undo the gain to find it, return sources at the model's level."""

        def __call__(self, batch):
            return super().__call__(batch / gain) * gain

    oracle = ScaledOracle(mixture, sources, atol=1e-5)
    out = Separator(oracle, chunk_seconds=3.0, overlap_seconds=1.0, normalize="rms").separate(mixture, SR)
    scores = pair_scores(out, sources)
    order = scores.argmax(axis=1)
    assert sorted(order) == [0, 1] and scores[[0, 1], order].min() >= 40.0
    np.testing.assert_allclose(out.sum(0), mixture, atol=1e-4)  # input level restored


# -- ClearVoice --------------------------------------------------------------------------------------------------


def official_decode_reference(x: np.ndarray, model) -> np.ndarray:
    """Literal re-statement of SPEC.md section 5 (path mode, batch item 0) with per-speaker lists."""
    sr, window_s, one_time = 16000, 2, 2
    window = int(sr * window_s)
    stride = int(window * 0.75)
    give_up = (window - stride) // 2
    t = x.shape[0]
    rms_in = (x.astype(np.float64) ** 2).mean() ** 0.5
    if t < window:
        x = np.concatenate([x, np.zeros(window - t, np.float32)])
    elif t < window + stride:
        x = np.concatenate([x, np.zeros(window + stride - t, np.float32)])
    elif (t - window) % stride != 0:
        x = np.concatenate([x, np.zeros(t - (t - window) // stride * stride, np.float32)])
    padded = x.shape[0]
    if t > sr * one_time:
        outputs = None
        current = 0
        while current + window <= padded:
            out = model(x[current:current + window][None])[0]
            if outputs is None:
                outputs = [np.zeros(padded, np.float32) for _ in range(out.shape[0])]
            for spk in range(out.shape[0]):
                if current == 0:
                    outputs[spk][current:current + window - give_up] = out[spk, :window - give_up]
                else:
                    outputs[spk][current + give_up:current + window - give_up] = out[spk, give_up:window - give_up]
            current += stride
    else:
        out = model(x[None])[0]
        outputs = [out[spk] for spk in range(out.shape[0])]
    result = []
    for spk_out in outputs:
        rms_out = (spk_out.astype(np.float64) ** 2).mean() ** 0.5
        result.append((spk_out / rms_out * rms_in)[:t])
    return np.stack(result)


def window_dependent_model(batch: np.ndarray) -> np.ndarray:
    """Deterministic stand-in whose output depends on the whole window (like the network's norms)."""
    centred = batch - batch.mean(-1, keepdims=True)
    scaled = batch * (1.0 + batch.std(-1, keepdims=True)) + 0.01 * np.cumsum(batch, -1) / batch.shape[-1]
    return np.stack([centred, scaled], axis=1).astype(np.float32)


def test_clearvoice_padding_rule():
    W, S = 32000, 24000
    assert clearvoice_padded_length(640000, W, S) == 680000  # 40 s, the spec's example
    assert clearvoice_padded_length(32000, W, S) == 56000  # exactly W: padded to W + S
    assert clearvoice_padded_length(16000, W, S) == 32000
    assert clearvoice_padded_length(40000, W, S) == 56000
    assert clearvoice_padded_length(80000, W, S) == 80000  # (T - W) multiple of S: no pad
    assert clearvoice_padded_length(90000, W, S) == 90000 + 90000 - 2 * S
    assert clearvoice_window_count(32000) == 1 and clearvoice_window_count(40000) == 2
    assert clearvoice_window_count(640000) == (680000 - W) // S + 1


@pytest.mark.parametrize("seconds", [0.7, 2.0, 2.5, 3.4, 5.0, 6.3, 40.0])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_clearvoice_matches_the_official_algorithm(seconds, batch_size):
    x = speech_like_sources(1, seconds, seed=int(seconds * 10))[0]
    got = clearvoice_separate(x, window_dependent_model, SR, batch_size=batch_size)
    want = official_decode_reference(x, window_dependent_model)
    assert got.shape == want.shape == (2, x.shape[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_clearvoice_scales_its_output_without_float64_copies():
    """The output's RMS match made two float64 copies of the whole [S, T] output (1.5 GB more per hour)."""
    import tracemalloc

    x = speech_like_sources(1, 60.0, seed=5)[0]
    tracemalloc.start()
    out = clearvoice_separate(x, lambda batch: np.stack([batch, 0.5 * batch], 1).astype(np.float32), SR,
                              batch_size=8)
    _, allocated = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # the [S, T] float32 output, the padded input, a batch of windows and float64 blocks; the two float64 copies of
    # the output alone were 4 x its size
    assert allocated < 3.5 * out.nbytes


def test_clearvoice_takes_a_model_whose_output_is_read_only():
    """One pass (2 s or less): the output was scaled in place, which failed on an exported model's read-only
    array ("assignment destination is read-only")."""
    def writable(batch):
        return np.stack([batch, 0.5 * batch], 1).astype(np.float32)

    def read_only(batch):
        out = writable(batch)
        out.flags.writeable = False
        return out

    x = speech_like_sources(1, 1.5, seed=6)[0]
    np.testing.assert_array_equal(clearvoice_separate(x, read_only, SR), clearvoice_separate(x, writable, SR))


def test_clearvoice_keeps_official_quirks():
    # 3.4 s: segmented, padded to 3.5 s, windows tile [0, 52000): the official output is zero after 52000.
    x = speech_like_sources(1, 3.4, seed=3)[0]
    out = clearvoice_separate(x, window_dependent_model, SR)
    assert np.all(out[:, 52000:] == 0) and np.any(out[:, :52000] != 0)
    # No permutation alignment: a model that swaps speakers on every call swaps them between windows.
    calls = []

    def swapping(batch):
        calls.append(1)
        out = np.stack([batch, 0.1 * batch], 1)
        return out[:, ::-1] if len(calls) % 2 == 0 else out

    y = clearvoice_separate(speech_like_sources(1, 6.0)[0], swapping, SR)
    loud_first = np.abs(y[0, 1000:20000]).mean() > np.abs(y[1, 1000:20000]).mean()
    loud_second = np.abs(y[0, 30000:45000]).mean() > np.abs(y[1, 30000:45000]).mean()
    assert loud_first != loud_second


class StandIn:
    """A callable model with a ``.config``, as Separator accepts for non-torch backends."""

    config = types.SimpleNamespace(sample_rate=SR, num_spks=2, encoder_kernel_size=16)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return window_dependent_model(batch)


def test_clearvoice_through_separator_equals_reference():
    x = speech_like_sources(1, 5.0, seed=9)[0]
    sep = Separator(StandIn(), stitching="clearvoice", normalize="none", batch_size=3)
    np.testing.assert_allclose(sep.separate(x, SR), official_decode_reference(x, window_dependent_model),
                               rtol=1e-5, atol=1e-6)
    # The official pipeline: audio_norm'ed input, level not restored.
    sep = Separator(StandIn(), stitching="clearvoice", normalize="clearvoice")
    want = official_decode_reference(clearvoice_audio_norm(x * 3), window_dependent_model)
    np.testing.assert_allclose(sep.separate(x * 3, SR), want, rtol=1e-5, atol=1e-6)


def test_clearvoice_audio_norm_levels():
    x = speech_like_sources(1, 3.0, seed=2)[0] * 7.0
    y = clearvoice_audio_norm(x)
    power = y.astype(np.float64) ** 2
    loud = power[power > power.mean()]
    assert abs(10 * np.log10(loud.mean()) + 25) < 0.01
    np.testing.assert_allclose(y / y[np.argmax(np.abs(y))], x / x[np.argmax(np.abs(y))], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("total", [1000, 32000, 32001, 56000, 100003])
def test_clearvoice_pass_length_and_count_are_what_clearvoice_separate_runs(total):
    from mossformer2.separation.stitching import clearvoice_pass_length, clearvoice_separate, clearvoice_window_count

    seen = []

    def model_fn(batch):
        seen.append(batch.shape[-1])
        return np.stack([batch, batch], axis=1)

    clearvoice_separate(np.ones(total, dtype=np.float32), model_fn)
    assert set(seen) == {clearvoice_pass_length(total)} and len(seen) == clearvoice_window_count(total)


def _turn_taking(seconds: float = 12.0, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``(sources [2, T], active [2, T] bool)`` of two clearly different voices (A dark, B bright noise with
    syllable-rate envelopes): A talks in 0-4.5 s and 7.5-12 s, B in 2.5-9.5 s, so only B talks in 4.5-7.5 s."""
    rng = np.random.default_rng(seed)
    T = int(seconds * SR)
    t = np.arange(T) / SR
    dark = np.convolve(rng.standard_normal(T), np.hanning(48), mode="same")
    bright = np.diff(rng.standard_normal(T + 1))
    voices = []
    for k, x in enumerate((dark, bright)):
        envelope = np.clip(np.sin(2 * np.pi * (3 + 1.3 * k) * t + rng.uniform(0, 6)), 0, None) ** 2
        y = x / x.std() * (0.05 + envelope)
        voices.append(0.1 * y / y.std())
    active = np.stack([(t < 4.5) | (t >= 7.5), (t >= 2.5) & (t < 9.5)])
    return np.stack(voices).astype(np.float32) * active, active


def _duplicating_model_output(sources: np.ndarray, active: np.ndarray, start: int, end: int, order: list[int],
                              rng: np.random.Generator) -> np.ndarray:
    """What a real model does where one voice talks alone: it puts that voice into every output, so an overlap
    holding one voice cannot tell the outputs apart."""
    seg, alone = sources[:, start:end], active[:, start:end].sum(0) == 1
    lone_voice = seg.sum(0)
    out = np.empty_like(seg)
    for row, spk in enumerate(order):
        copy = 0.8 * lone_voice + 0.02 * rng.standard_normal(lone_voice.shape).astype(np.float32)
        out[row] = np.where(alone, copy, seg[spk])
    return out


def test_an_overlap_where_one_voice_talks_alone_is_decided_by_the_voices():
    """A turn-taking recording: the overlap at 5.0-6.5 s holds B only, which the model puts into both outputs.
    That overlap leans (by chance, here made to) towards the wrong order, which swapped A and B for the rest of
    the file; the voices heard so far are clear and decide instead."""
    from mossformer2.separation.stitching import DECISIVE_MARGIN_DB, match_sources_with_margin

    sources, active = _turn_taking()
    rng = np.random.default_rng(0)
    plan = plan_chunks(sources.shape[-1], 4 * SR, int(1.5 * SR))
    assert (5 * SR, 9 * SR) in plan
    stitcher = AlignedStitcher(2, sources.shape[-1], sample_rate=SR)
    for index, (start, end) in enumerate(plan):
        out = _duplicating_model_output(sources, active, start, end, [1, 0] if index % 2 else [0, 1], rng)
        if start == 5 * SR:  # the undecided overlap, leaning to the wrong order (the truth is [0, 1] here)
            written = stitcher.output[:, start:plan[index - 1][1]]
            lean = written.shape[-1]
            out[:, :lean] = np.stack([0.51 * written[1] + 0.49 * written[0], 0.51 * written[0] + 0.49 * written[1]])
            by_overlap, _, margin = match_sources_with_margin(out[:, :lean], written)
            assert margin < DECISIVE_MARGIN_DB and list(by_overlap) == [1, 0]
        stitcher.add(start, out)
    both = active.all(0)  # where both talk the outputs are exact: each must hold one speaker throughout
    first, later = both & (np.arange(both.size) < 5 * SR), both & (np.arange(both.size) >= 5 * SR)
    for region in (first, later):
        np.testing.assert_allclose(stitcher.output[:, region], sources[:, region], atol=1e-6)
    assert stitcher.uncertain == []


def test_a_guessed_speaker_order_is_reported_once():
    """Without a clear overlap and without enough clear speech to compare voices, the stitcher says where it
    guessed (in seconds), in one warning that a program can catch; silent stretches are not reported, nor the
    first boundary into sound (after nothing but silence no order can be wrong)."""
    from mossformer2.separation.stitching import stitch_aligned

    rng = np.random.default_rng(1)
    lone = 0.1 * rng.standard_normal(8 * SR).astype(np.float32)  # one voice throughout: never dominant anywhere
    wave = np.concatenate([np.zeros(8 * SR, np.float32), lone])

    def duplicating(batch: np.ndarray) -> np.ndarray:
        return np.stack([np.stack([c * (0.8 + 0.05 * rng.standard_normal(c.shape)).astype(np.float32)] * 2)
                         for c in batch])  # silence stays silent

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stitch_aligned(wave, duplicating, 2, 4 * SR, SR, sample_rate=SR)
    guesses = [str(w.message) for w in caught if "was a guess" in str(w.message)]
    assert len(guesses) == 1
    starts = [s for s, _ in plan_chunks(wave.size, 4 * SR, SR)][1:]
    sounding = [s for s in starts if s + 4 * SR > 8 * SR]  # chunks that reach the voice
    after_sound = [s for s in sounding if s + SR > 8 * SR]  # their overlap with the past reaches it too
    assert len(after_sound) == len(sounding) - 1  # the first chunk into the voice followed only silence
    assert f"({after_sound[0] / SR:.1f} s" in guesses[0] and f"{sounding[0] / SR:.1f} s" not in guesses[0]
    assert f"at {len(after_sound)} chunk boundar" in guesses[0]


def test_matching_whole_long_signals_sums_in_blocks():
    """Aligning the channels of a long file matches whole signals: the float64 sums run over blocks (same result
    as one block), instead of full-length float64 copies (an hour of stereo: ~1.8 GB)."""
    import tracemalloc

    from mossformer2.separation.stitching import _pair_si_sdr

    rng = np.random.default_rng(0)
    est = (rng.standard_normal((2, 3000)) + [[0.3], [-2.0]]).astype(np.float32)
    ref = (est[::-1] + 0.5 * rng.standard_normal((2, 3000))).astype(np.float32)
    np.testing.assert_allclose(_pair_si_sdr(est, ref, block=7)[0], _pair_si_sdr(est, ref, block=1 << 20)[0],
                               rtol=1e-9)
    long_est = rng.standard_normal((2, 1 << 22)).astype(np.float32)
    long_ref = long_est[::-1].copy()
    tracemalloc.start()
    try:
        order, _ = match_sources(long_est, long_ref)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert list(order) == [1, 0]
    assert peak < 0.75 * long_est.nbytes  # float64 blocks of 256 k samples and their products: ~16 MB


def test_pauses_and_room_noise_stay_out_of_the_voice_profiles():
    """A chunk of room noise only (one output happening to be louder) must not add noise spectra to a voice
    profile: frames count only within 45 dB of the loudest frame seen so far (and above -80 dBFS)."""
    from mossformer2.separation.stitching import VoiceProfiles

    profiles = VoiceProfiles(2)
    profiles.add(speech_like_sources(2, 4.0, seed=2) * np.array([[1.0], [0.05]], np.float32))  # speaker 0 dominates
    counts = profiles.counts.copy()
    assert counts[0] >= VoiceProfiles.MIN_FRAMES
    noise = 3e-4 * np.random.default_rng(0).standard_normal(4 * SR).astype(np.float32)  # about -70 dBFS
    profiles.add(np.stack([noise, 0.3 * noise]))
    np.testing.assert_array_equal(profiles.counts, counts)
    fresh = VoiceProfiles(2)  # nothing louder seen yet: the absolute floor still keeps near-silence out
    fresh.add(np.stack([1e-5 * noise / 3e-4, 3e-6 * noise / 3e-4]))
    assert fresh.counts.sum() == 0


def test_a_weak_anti_correlation_in_an_overlap_does_not_flip_what_follows():
    """Only a clear anti-correlation (FLIP_MIN_ANTICORRELATION) negates a chunk: at -0.2 the overlap is mostly
    something else, and a flip there would invert the rest of the speaker's track."""
    rng = np.random.default_rng(0)
    total, chunk, overlap = 4000, 2500, 1000
    a, b = rng.standard_normal((2, total)).astype(np.float32)
    stitcher = AlignedStitcher(2, total)
    stitcher.add(0, np.stack([a[:chunk], b[:chunk]]))
    start = total - chunk
    second = np.stack([a[start:], b[start:]])
    second[0, :overlap] = -0.2 * a[start:start + overlap] + rng.standard_normal(overlap).astype(np.float32)
    assert -0.4 < np.corrcoef(second[0, :overlap], a[start:start + overlap])[0, 1] < -0.05
    stitcher.add(start, second)
    np.testing.assert_array_equal(stitcher.output[0, chunk:], a[chunk:])


def test_stitching_silence_gives_silence():
    """The silence level scales with the input's: an all-zero input made it 0 and its log a math domain error."""
    from mossformer2.separation.stitching import stitch_aligned

    out = stitch_aligned(np.zeros(8000, np.float32), lambda batch: np.zeros((len(batch), 2, batch.shape[-1]),
                                                                            np.float32), 2, 3000, 1000)
    assert out.shape == (2, 8000) and not out.any()


def test_pair_correlation_is_zero_mean():  # S04
    rng = np.random.default_rng(0)
    est = (rng.standard_normal((2, 4000)) + [[3.0], [-2.0]]).astype(np.float32)
    ref = (est[::-1] - [[-2.0], [3.0]] + rng.standard_normal((2, 4000))).astype(np.float32)  # ref means 0
    rho = _pair_si_sdr(est, ref)[1]
    c = est - est.mean(1, keepdims=True)
    r = ref - ref.mean(1, keepdims=True)
    want = (c @ r.T) / np.sqrt((c ** 2).sum(1)[:, None] * (r ** 2).sum(1)[None])
    np.testing.assert_allclose(rho, want, atol=1e-6)


def test_crossfade_windows_are_mirror_images():  # S03
    fade_out, fade_in = crossfade_weights(64)
    np.testing.assert_allclose(fade_out, fade_in[::-1], atol=1e-7)


def test_frames_where_outputs_are_about_equally_loud_stay_out_of_the_profiles():  # S08
    x = 0.1 * np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    profiles = VoiceProfiles(2)
    profiles.add(np.stack([x, 0.8 * x]))  # the model duplicating one voice, 2 dB apart
    assert profiles.counts.sum() == 0


def test_a_voice_without_a_profile_cannot_sway_the_order():  # S09
    rng = np.random.default_rng(1)
    dark = np.convolve(rng.standard_normal(32000), np.hanning(48), mode="same").astype(np.float32)
    bright = np.diff(rng.standard_normal(32001)).astype(np.float32)
    dark, bright = 0.1 * dark / dark.std(), 0.1 * bright / bright.std()
    profiles = VoiceProfiles(2)
    profiles.add(np.stack([dark, 1e-3 * bright]))  # output 0 has a (dark) profile, output 1 none
    assert profiles.counts[0] >= 8 and profiles.counts[1] == 0
    new_chunk = np.stack([bright, 1e-3 * dark])  # new side: output 0 (bright) known, output 1 none
    order, lead = profiles.order(new_chunk)
    new_sums, new_counts = profiles.measure(new_chunk)
    d = np.sqrt(((new_sums[0] / new_counts[0] - profiles.sums[0] / profiles.counts[0]) ** 2).mean())
    assert list(order) == [1, 0] and lead == pytest.approx(d)  # bright is not the dark voice: moved away


def test_signs_follow_the_order_the_voices_chose():  # S15
    from mossformer2.separation.stitching import match_sources
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 3000)).astype(np.float32)
    st = AlignedStitcher(2, 3000)
    st.add(0, np.stack([a[:2000], b[:2000]]))
    s = np.float32(np.sqrt(0.5))
    chunk = np.stack([b[1000:], a[1000:]]).copy()
    chunk[:, :1000] = np.stack([(a[1000:2000] - b[1000:2000]) * s, (a[1000:2000] + b[1000:2000]) * s])
    written = st.output[:, 1000:2000].copy()
    voice = match_sources(chunk[:, :1000], written)[0][::-1].copy()  # the voices overrule the (undecided) overlap
    st.profiles.order = lambda sources: (voice, 50.0)
    st.add(1000, chunk)
    for j in range(2):
        rho = np.corrcoef(chunk[voice[j], :1000], written[j])[0, 1]
        sign = -1.0 if rho < -0.5 else 1.0
        np.testing.assert_array_equal(st.output[j, 2000:], sign * chunk[voice[j], 1000:])


def test_a_loud_input_keeps_the_absolute_silence_level():  # S16
    loud = np.full(1000, 10 * TARGET_RMS, np.float32)
    assert silence_peak_for(loud) == SILENCE_PEAK
    assert silence_peak_for(loud / 100) == pytest.approx(SILENCE_PEAK / 10, rel=1e-4)


def test_a_guess_after_a_silent_chunk_is_still_reported():  # S19
    SR = 16000
    rng = np.random.default_rng(1)
    v = 0.1 * rng.standard_normal(4 * SR).astype(np.float32)
    wave = np.concatenate([v, np.zeros(6 * SR, np.float32), v])  # voice, a long pause (a silent chunk), voice

    def duplicating(batch):
        return np.stack([np.stack([c * (0.8 + 0.05 * rng.standard_normal(c.shape)).astype(np.float32)] * 2)
                         for c in batch])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stitch_aligned(wave, duplicating, 2, 4 * SR, SR, sample_rate=SR)
    guesses = [str(w.message) for w in caught if "was a guess" in str(w.message)]
    assert guesses and "9.0 s" in guesses[0]  # the first boundary into the voice after the pause

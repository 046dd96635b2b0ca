"""Inference-time refinements (separation/refine.py) and how checkpoints recommend them to the Separator."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.signal import istft, stft

from mossformer2 import build_model, save_checkpoint
from mossformer2.cli import REFINEMENT_HELP, describe_refinements
from mossformer2.losses import best_permutation, pairwise_si_sdr, si_sdr
from mossformer2.separation import Separator, load_separation_model
from mossformer2.separation.refine import mixture_consistency, polarity_ensemble, wiener_filter
from mossformer2.separation.stitching import match_sources
from mossformer2.separation_settings import REFINEMENTS
from tests.conftest import make_tiny_config

RATE = make_tiny_config().sample_rate  # no resampling: the sum of the outputs is exact


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(make_tiny_config()).eval()


def test_match_sources_recovers_order_and_polarity():
    reference = randn(3, 400)
    estimate = reference[[2, 0, 1]] * np.array([[-1.0], [1.0], [-1.0]], np.float32) + 0.1 * randn(3, 400, seed=1)
    order, signs = match_sources(estimate, reference)
    np.testing.assert_array_equal(order, [1, 2, 0])
    np.testing.assert_array_equal(signs, [1.0, -1.0, -1.0])
    assert np.abs(signs[:, None] * estimate[order] - reference).max() < 0.6


def test_match_sources_maximises_summed_si_sdr():
    """The order is the one the training loss's PIT would pick (summed SI-SDR), including where it differs from
    matching the single best pair first."""
    rng = np.random.default_rng(7)
    for _ in range(50):
        reference = rng.standard_normal((3, 64))
        estimate = reference[rng.permutation(3)] * rng.uniform(0.2, 1.0, (3, 1)) + rng.standard_normal((3, 64))
        order, _ = match_sources(estimate, reference)
        scores = pairwise_si_sdr(torch.from_numpy(estimate)[None], torch.from_numpy(reference)[None])
        perm = best_permutation(scores)[0]  # estimate i -> reference perm[i]
        np.testing.assert_array_equal(order, torch.argsort(perm).numpy())


class PolarityOracle:
    """Stands in for a model: on the first half of a batch it returns ``sources + error_a``; on the second (the
    negated inputs) it returns, per item, the speakers swapped and with arbitrary polarity, plus ``error_b``,
    and large decoys past each item's length that would mislead an alignment over the padded length."""

    def __init__(self, sources: np.ndarray, lengths: list[int]) -> None:
        self.sources, self.lengths = sources, lengths
        self.error_a = 0.1 * randn(*sources.shape, seed=2)
        self.error_b = 0.1 * randn(*sources.shape, seed=3)
        self.signs = np.array([[[1.0], [-1.0]], [[-1.0], [-1.0]]], np.float32)[: sources.shape[0]]
        self.calls: list[tuple[tuple[int, ...], list[int] | None]] = []

    def __call__(self, batch: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
        self.calls.append((tuple(batch.shape), None if lengths is None else lengths.tolist()))
        size = self.sources.shape[0]
        direct = self.sources + self.error_a
        flipped = -(self.sources + self.error_b)[:, [1, 0]] * self.signs
        for b, n in enumerate(self.lengths):
            flipped[b, :, n:] = 50.0 * (self.sources[b, [1, 0], n:] if n < self.sources.shape[-1] else 0.0)
        assert batch.shape[0] == 2 * size
        return np.concatenate([direct, flipped])


def test_polarity_ensemble_runs_one_doubled_batch_and_averages_aligned_estimates():
    sources = randn(2, 2, 600)
    lengths = [600, 450]
    oracle = PolarityOracle(sources, lengths)
    out = polarity_ensemble(oracle, sources.sum(1), np.array(lengths))
    assert oracle.calls == [((4, 600), [600, 450, 600, 450])]
    expected = sources + (oracle.error_a + oracle.error_b) / 2
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(out[b, :, :n], expected[b, :, :n], rtol=1e-5, atol=1e-6)


def test_a_long_ensemble_batch_runs_its_halves_one_after_the_other(monkeypatch):
    """Both halves in one batch doubled the network's activation memory: 9.8 GiB for a 10-minute file in one pass
    on the CPU. Beyond ENSEMBLE_BATCH_SAMPLES they run in turn, with the same result."""
    import mossformer2.separation.refine as refine

    calls = []

    def linear(batch, lengths):  # (0.25 x, 0.75 x): the ensemble of an odd model is the model
        calls.append(batch.shape)
        return np.stack([0.25 * batch, 0.75 * batch], axis=1)

    wave = randn(2, 600)
    monkeypatch.setattr(refine, "ENSEMBLE_BATCH_SAMPLES", 1200)
    together = polarity_ensemble(linear, wave)
    monkeypatch.setattr(refine, "ENSEMBLE_BATCH_SAMPLES", 1199)
    in_turn = polarity_ensemble(linear, wave)
    assert calls == [(4, 600), (2, 600), (2, 600)]
    np.testing.assert_array_equal(in_turn, together)
    np.testing.assert_allclose(together, linear(wave, None)[:], rtol=1e-6)


def test_polarity_ensemble_of_a_real_network_is_the_mean_of_both_passes(tiny_model):
    wave = randn(1, 1200)
    with torch.no_grad():
        direct = tiny_model(torch.from_numpy(wave))[0].numpy()
        flipped = -tiny_model(torch.from_numpy(-wave))[0].numpy()
        out = polarity_ensemble(lambda x, n: tiny_model(torch.from_numpy(x)).numpy(), wave)[0]
    order, signs = match_sources(flipped, direct)
    np.testing.assert_allclose(out, (direct + flipped[order] * signs[:, None]) / 2, rtol=1e-5, atol=1e-7)
    # The network is not odd-symmetric (ReLU encoder), so the second pass is a different estimate.
    assert np.abs(direct - out).max() > 1e-3


def test_mixture_consistency_sums_to_the_mixture_and_fixes_polarity_first():
    sources = randn(2, 2, 500)
    mixture = sources.sum(1)
    estimates = sources + 0.2 * randn(2, 2, 500, seed=5)
    estimates[0, 1] *= -1  # an SI-SDR model may put a speaker out negated
    out = mixture_consistency(estimates, mixture)
    np.testing.assert_allclose(out.sum(1), mixture, atol=1e-5)
    # Negated first, so each output moved towards its source (the residual is shared, not the flipped source).
    error_before = estimates - sources
    error_before[0, 1] = -estimates[0, 1] - sources[0, 1]
    assert np.linalg.norm(out - sources) < np.linalg.norm(error_before)
    assert np.all(np.einsum("bsl,bl->bs", out, mixture) > 0)


@pytest.mark.parametrize(("refine", "full", "short"), [(mixture_consistency, 300, 200), (wiener_filter, 6000, 1000)])
def test_refinements_ignore_padding(refine, full, short):
    """A padded item is refined over its true length alone (for the Wiener filter: shorter than one 4096-sample
    window, so with a window of its length), its padding stays zero, and the outputs sum to the mixture."""
    mixture = randn(2, full)
    mixture[1, short:] = 0.0
    estimates = randn(2, 2, full, seed=1)
    out = refine(estimates, mixture, np.array([full, short]))
    assert np.all(out[1, :, short:] == 0)
    np.testing.assert_allclose(out.sum(1), mixture, atol=1e-5)
    np.testing.assert_allclose(out[1, :, :short], refine(estimates[1:, :, :short], mixture[1:, :short])[0], atol=1e-6)


def _tones(samples: int, rate: int = RATE) -> np.ndarray:
    """Two sources with disjoint spectra: [2, samples]."""
    t = np.arange(samples) / rate
    return np.stack([np.sin(2 * np.pi * 300 * t), 0.7 * np.sin(2 * np.pi * 1800 * t)]).astype(np.float32)


def test_wiener_filter_sums_to_the_mixture_and_removes_leakage_between_disjoint_spectra():
    sources = _tones(16000)
    mixture = sources.sum(0)
    leaky = np.stack([sources[0] + 0.4 * sources[1], sources[1] + 0.4 * sources[0]])  # each holds some of the other
    out = wiener_filter(leaky[None], mixture[None])[0]
    assert out.dtype == np.float32 and out.shape == leaky.shape
    np.testing.assert_allclose(out.sum(0), mixture, atol=1e-5)
    before = si_sdr(torch.from_numpy(leaky), torch.from_numpy(sources))
    after = si_sdr(torch.from_numpy(out), torch.from_numpy(sources))
    # On each tone's bins the power masks are 1 : 0.16, so the other estimate keeps 0.14 of that tone instead of
    # 0.4: about 9 dB less leakage (measured 11.1 -> 19.0 dB and 4.9 -> 12.8 dB).
    assert bool((after > before + 7).all())


def test_wiener_filter_shares_unclaimed_bins_and_keeps_too_short_inputs():
    mixture = randn(1, 6000)
    silent = wiener_filter(np.zeros((1, 2, 6000), np.float32), mixture)
    np.testing.assert_allclose(silent[0], np.stack([mixture[0], mixture[0]]) / 2, atol=1e-5)
    estimates = randn(1, 2, 3, seed=1)
    np.testing.assert_array_equal(wiener_filter(estimates, mixture[:, :3]), estimates)


def test_every_refinement_has_a_command_option():
    assert tuple(REFINEMENT_HELP) == REFINEMENTS


def test_separator_applies_the_refinements_on_every_path(tiny_model):
    wave = randn(2400)
    plain = Separator(tiny_model, device="cpu", polarity_ensemble=False, mixture_consistency=False)
    refined = Separator(tiny_model, device="cpu", polarity_ensemble=True, mixture_consistency=True)
    assert describe_refinements(plain) == "none"
    assert describe_refinements(refined) == "polarity ensemble + mixture consistency"
    out = refined.separate(wave, RATE)
    np.testing.assert_allclose(out.sum(0), wave, atol=1e-5)  # consistent, and the level restored
    assert np.abs(out - plain.separate(wave, RATE)).max() > 1e-4
    # The Wiener filter's outputs also sum to the input, and differ from the ensemble's alone.
    wiener = Separator(tiny_model, device="cpu", polarity_ensemble=True, wiener_filter=True)
    assert wiener.refinements == {"polarity_ensemble": True, "wiener_filter": True, "mixture_consistency": False}
    filtered = wiener.separate(wave, RATE)
    np.testing.assert_allclose(filtered.sum(0), wave, atol=1e-5)
    ensemble = Separator(tiny_model, device="cpu", polarity_ensemble=True).separate(wave, RATE)
    assert np.abs(filtered - ensemble).max() > 1e-4
    # Chunked (stitched) and padded-batch paths are refined too: each chunk's sources sum to the chunk.
    chunked = Separator(tiny_model, device="cpu", chunk_seconds=0.1, overlap_seconds=0.02, mixture_consistency=True)
    np.testing.assert_allclose(chunked.separate(wave, RATE).sum(0), wave, atol=1e-5)
    chunked = Separator(tiny_model, device="cpu", chunk_seconds=0.1, overlap_seconds=0.02, wiener_filter=True)
    np.testing.assert_allclose(chunked.separate(wave, RATE).sum(0), wave, atol=1e-5)
    for single_sep in (refined, wiener):
        batched = Separator(tiny_model, device="cpu", batch_size=3, **single_sep.refinements)
        waves = [wave, wave[:1500], wave[:1900]]
        for single, many in zip([single_sep.separate(w, RATE) for w in waves], batched.separate_many(waves, RATE)):
            np.testing.assert_allclose(many, single, atol=1e-5)


def test_checkpoint_recommends_refinements_and_arguments_override(tiny_model, tmp_path):
    plain = tmp_path / "plain.pt"
    save_checkpoint(plain, tiny_model)
    recommending = tmp_path / "recommending.pt"
    save_checkpoint(recommending, tiny_model, extra={"separation": {"polarity_ensemble": True, "wiener_filter": True,
                                                                    "mixture_consistency": False}})
    assert load_separation_model(plain, "cpu").separation_settings == {}
    model = load_separation_model(recommending, "cpu")
    assert model.separation_settings == {"polarity_ensemble": True, "wiener_filter": True,
                                         "mixture_consistency": False}
    sep = Separator(model, device="cpu")
    assert sep.polarity_ensemble and sep.wiener_filter and not sep.mixture_consistency
    assert not Separator(model, device="cpu", wiener_filter=False).wiener_filter
    sep = Separator.from_pretrained(recommending, device="cpu", polarity_ensemble=False, mixture_consistency=True)
    assert not sep.polarity_ensemble and sep.mixture_consistency
    assert not Separator.from_pretrained(plain, device="cpu").polarity_ensemble


def test_bad_separation_entries_are_reported(tiny_model, tmp_path):
    path = tmp_path / "bad.pt"
    for entry, message in (({"polarity_ensemble": "yes"}, "polarity_ensemble.*true or false"),
                           (["polarity_ensemble"], "'separation' must map")):
        with pytest.raises(ValueError, match=message):  # save_checkpoint writes none
            save_checkpoint(path, tiny_model, extra={"separation": entry})
        raw = torch.load(save_checkpoint(path, tiny_model), weights_only=True)  # a file from elsewhere has them
        torch.save({**raw, "separation": entry}, path)
        with pytest.raises(ValueError, match=message):
            load_separation_model(path, "cpu")
    newer = {"polarity_ensemble": True, "shifts": 4}  # a name a newer version knows: warned about, left out
    with pytest.warns(UserWarning, match=r"extra\['separation'\]: ignoring unknown separation settings \['shifts'\]"):
        save_checkpoint(path, tiny_model, extra={"separation": newer})
    assert torch.load(path, weights_only=True)["separation"] == {"polarity_ensemble": True}  # written as checked
    torch.save({**torch.load(path, weights_only=True), "separation": newer}, path)  # a newer version's file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_separation_model(path, "cpu").separation_settings == {"polarity_ensemble": True}
    assert any("ignoring unknown separation settings ['shifts']" in str(w.message) for w in caught)


def test_polarity_ensemble_aligns_on_the_true_length_only():  # R03
    sources, n = randn(1, 2, 600), 300

    def model(batch, lengths):
        flipped = -sources[:, [1, 0]].copy()  # the second pass: speakers swapped (after negating back)
        flipped[:, :, n:] = -100.0 * sources[:, :, n:]  # padding garbage in the *other* order
        return np.concatenate([sources, flipped])

    out = polarity_ensemble(model, sources.sum(1), np.array([n]))
    np.testing.assert_allclose(out[0, :, :n], sources[0, :, :n], atol=1e-6)


def test_mixture_consistency_shares_the_residual_among_all_speakers():  # R08
    sources = randn(1, 3, 400)
    mixture = sources.sum(1)
    estimates = sources + 0.3 * randn(1, 3, 400, seed=1)
    np.testing.assert_allclose(mixture_consistency(estimates, mixture).sum(1), mixture, atol=1e-5)


def test_mixture_consistency_keeps_padding_zero_even_under_a_nonzero_mixture_padding():  # R06
    mixture, estimates = randn(1, 300), randn(1, 2, 300, seed=1)
    out = mixture_consistency(estimates, mixture, np.array([200]))
    assert np.all(out[0, :, 200:] == 0)


def _reference_wiener(src, mix, window, overlap, power):
    _, _, X = stft(mix, nperseg=window, noverlap=overlap)
    _, _, S = stft(src, nperseg=window, noverlap=overlap)
    w = np.abs(S) ** power
    _, y = istft(w / w.sum(0) * X, nperseg=window, noverlap=overlap)
    return y[:, :mix.shape[-1]]


def test_wiener_filter_is_the_documented_filter_75_percent_overlap_and_power():  # R10, R11
    mix, src = randn(6000), randn(2, 6000, seed=3)
    for power in (1.0, 2.0):
        got = wiener_filter(src[None], mix[None], fft_size=1024, power=power)[0]
        np.testing.assert_allclose(got, _reference_wiener(src, mix, 1024, 768, power), atol=1e-5)

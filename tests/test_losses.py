"""mossformer2.losses: SI-SDR values, PIT permutations (exhaustive and Hungarian), masking, gradients, clamp."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio as tm_si_sdr

from mossformer2.losses import best_permutation, pairwise_si_sdr, pit_si_sdr_loss, reorder_estimates, si_sdr


def _noisy(ref: torch.Tensor, level: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ref + level * torch.randn(ref.shape, generator=g)


def test_si_sdr_matches_torchmetrics():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 3, 1000, generator=g)
    est = ref * 0.5 + 0.3 * torch.randn(ref.shape, generator=g) + 0.1  # scaled, noisy, with an offset
    ours = si_sdr(est, ref)
    theirs = tm_si_sdr(est, ref, zero_mean=True)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-4)


def test_masked_lengths_ignore_padding():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(2, 2, 800, generator=g)
    est = _noisy(ref, 0.5, 2)
    lengths = torch.tensor([800, 500])
    padded_est, padded_ref = est.clone(), ref.clone()
    padded_est[1, :, 500:] = 100.0 * torch.randn(2, 300, generator=g)  # garbage in the padding
    padded_ref[1, :, 500:] = 0.0
    masked = si_sdr(padded_est, padded_ref, lengths)
    torch.testing.assert_close(masked[0], tm_si_sdr(est[0], ref[0], zero_mean=True), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(masked[1], tm_si_sdr(est[1, :, :500], ref[1, :, :500], zero_mean=True),
                               atol=1e-3, rtol=1e-4)
    loss, _ = pit_si_sdr_loss(padded_est, padded_ref, lengths, reduction="none")
    torch.testing.assert_close(loss, -masked.mean(-1), atol=1e-4, rtol=1e-4)
    # A [T] pair with its one length (a raw expand error before)
    torch.testing.assert_close(si_sdr(padded_est[1, 0], padded_ref[1, 0], torch.tensor(500)), masked[1, 0])


@pytest.mark.parametrize("num_spks", [2, 3, 4, 5])
def test_known_permutations_recovered_exactly(num_spks):
    g = torch.Generator().manual_seed(num_spks)
    B, T = 6, 400
    ref = torch.randn(B, num_spks, T, generator=g)
    perms = torch.stack([torch.randperm(num_spks, generator=g) for _ in range(B)])  # est i = ref perms[b, i]
    est = torch.stack([ref[b, perms[b]] for b in range(B)]) + 0.05 * torch.randn(B, num_spks, T, generator=g)
    loss, perm = pit_si_sdr_loss(est, ref, reduction="none")
    assert torch.equal(perm, perms)
    assert loss.shape == (B,)
    aligned = reorder_estimates(est, perm)
    torch.testing.assert_close(loss, -si_sdr(aligned, ref).mean(-1), atol=1e-4, rtol=1e-4)
    assert (loss < -20).all()  # 0.05 noise on unit-variance sources: about 26 dB


def test_hungarian_agrees_with_exhaustive_search():
    import itertools

    g = torch.Generator().manual_seed(7)
    score = torch.randn(20, 4, 4, generator=g)
    perm = best_permutation(score)  # 4 speakers: Hungarian
    for b in range(score.shape[0]):
        best = max(itertools.permutations(range(4)), key=lambda p: sum(float(score[b, i, p[i]]) for i in range(4)))
        assert perm[b].tolist() == list(best)


@pytest.mark.parametrize("num_spks", [2, 3, 4, 5])
def test_a_non_finite_estimate_gives_a_nan_loss_for_any_speaker_count(num_spks):
    """The trainer skips a step whose loss is NaN; with 4+ speakers scipy's search raised on the NaN scores
    instead (a ValueError that ended the run)."""
    g = torch.Generator().manual_seed(num_spks)
    ref = torch.randn(3, num_spks, 200, generator=g)
    est = _noisy(ref, 0.1, 5)
    est[1, 0, 7] = float("nan")
    est[2, 1, 3] = float("inf")
    loss, perm = pit_si_sdr_loss(est, ref, reduction="none")
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()
    assert torch.equal(perm[0], torch.arange(num_spks))
    assert all(sorted(p.tolist()) == list(range(num_spks)) for p in perm)  # still permutations


def test_batch_loss_is_mean_of_per_example_losses():
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(5, 2, 300, generator=g)
    est = _noisy(ref.flip(1), 1.0, 4)
    per_example = torch.stack([pit_si_sdr_loss(est[b:b + 1], ref[b:b + 1])[0] for b in range(5)])
    batch, _ = pit_si_sdr_loss(est, ref)
    torch.testing.assert_close(batch, per_example.mean())


def test_pairwise_matrix_entries():
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(2, 3, 500, generator=g)
    mixing = torch.rand(2, 3, 3, generator=g)  # every estimate leaks every reference: moderate dB values
    est = torch.einsum("bij,bjt->bit", mixing, ref) + 0.1 * torch.randn(2, 3, 500, generator=g)
    pair = pairwise_si_sdr(est, ref)
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(pair[:, i, j], tm_si_sdr(est[:, i], ref[:, j], zero_mean=True),
                                       atol=1e-3, rtol=1e-4)


def test_gradients_finite_on_silent_targets_and_estimates():
    ref = torch.zeros(2, 2, 400)
    ref[0, 0] = torch.randn(400)
    est = torch.zeros(2, 2, 400, requires_grad=True)
    loss, _ = pit_si_sdr_loss(est + 0.0, ref, lengths=torch.tensor([400, 0]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(est.grad).all()


def test_clamp_caps_each_pair():
    g = torch.Generator().manual_seed(6)
    ref = torch.randn(3, 2, 500, generator=g)
    est = ref + 1e-4 * torch.randn(ref.shape, generator=g)  # ~80 dB
    unclamped, _ = pit_si_sdr_loss(est, ref)
    clamped, _ = pit_si_sdr_loss(est, ref, clamp_db=30.0)
    assert float(unclamped) < -60
    assert float(clamped) == pytest.approx(-30.0)
    est.requires_grad_(True)
    pit_si_sdr_loss(est, ref, clamp_db=30.0)[0].backward()
    assert float(est.grad.abs().max()) == 0.0  # clamped pairs give no gradient


def test_lengths_are_one_length_in_range_per_item():
    """Negative or too long lengths were taken; a [B, 1] tensor or a list gave raw einsum / attribute errors."""
    est, ref = torch.zeros(2, 2, 10), torch.randn(2, 2, 10)
    for lengths, message in ((torch.tensor([10, -5]), r"must lie in 0..10 samples, got \[10, -5\]"),
                             (torch.tensor([10, 11]), "must lie in 0..10"),
                             (torch.tensor([[10], [9]]), r"integer tensor \[2\] .*got \(2, 1\)"),
                             ([10, 9], "integer tensor .*got list"), (torch.tensor([10.0, 9.0]), "integer tensor")):
        with pytest.raises(ValueError, match=message):
            pit_si_sdr_loss(est, ref, lengths=lengths)


def test_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        pit_si_sdr_loss(torch.zeros(2, 2, 10), torch.zeros(2, 3, 10))
    with pytest.raises(ValueError, match="reduction"):
        pit_si_sdr_loss(torch.zeros(1, 2, 10), torch.ones(1, 2, 10), reduction="sum")


def test_numpy_arrays_give_a_clear_type_error():
    np = pytest.importorskip("numpy")
    est, ref = np.random.randn(2, 100), np.random.randn(2, 100)
    for loss in (si_sdr, pairwise_si_sdr, pit_si_sdr_loss):
        args = (est[None], ref[None]) if loss is not si_sdr else (est, ref)
        with pytest.raises(TypeError, match="take torch tensors .* got ndarray and ndarray: for NumPy arrays use "
                                            "mossformer2.metrics.si_sdr"):
            loss(*args)


def test_clamp_caps_only_from_above():  # L10
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 2, 500, generator=g)
    est = 1e-3 * ref + torch.randn(ref.shape, generator=g)  # every pair far below 30 dB (about -60 dB)
    torch.testing.assert_close(pit_si_sdr_loss(est, ref, clamp_db=30.0)[0], pit_si_sdr_loss(est, ref)[0])

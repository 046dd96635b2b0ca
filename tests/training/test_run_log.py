"""training/run_log.py: the levels of the audio examples written to TensorBoard, and closing the writer."""

from __future__ import annotations

import torch

from mossformer2.training.run_log import RunLog


class _Writer:
    """Records what RunLog hands to a SummaryWriter."""

    def __init__(self) -> None:
        self.audio: dict[str, torch.Tensor] = {}
        self.closed = False

    def add_audio(self, tag, wave, step, sample_rate):
        self.audio[tag] = wave

    def close(self):
        self.closed = True


def _logged(mix, est, ref) -> dict[str, torch.Tensor]:
    run_log = RunLog(None)
    run_log.writer = _Writer()
    run_log.audio("ex", mix, est, ref, step=1, sample_rate=8000)
    return run_log.writer.audio


def test_tensorboard_estimates_are_scaled_into_full_scale():
    """16-bit audio clips beyond +-1: loud estimates (an untrained model's may be) are scaled down, not clipped."""
    mix = 0.5 * torch.sin(torch.linspace(0, 50, 800))
    est = torch.stack([3.0 * mix, -2.0 * mix])
    audio = _logged(mix, est, torch.stack([mix, mix]))
    assert float(audio["valid/ex/s1"].abs().max()) <= 1.0 and float(audio["valid/ex/s2"].abs().max()) <= 1.0
    torch.testing.assert_close(audio["valid/ex/s2"], -2 / 3 * audio["valid/ex/s1"])  # one level for all


def test_tensorboard_mixture_and_references_share_a_level_that_fits_the_references_too():
    """A reference louder than the mixture (speakers in opposite phase) must not clip."""
    t = torch.linspace(0, 50, 800)
    ref = torch.stack([0.9 * torch.sin(t), -0.8 * torch.sin(t)])
    mix = ref.sum(0)  # 0.1 sin
    audio = _logged(mix, ref.clone(), ref)
    assert float(audio["valid/ex/reference1"].abs().max()) <= 1.0
    torch.testing.assert_close(audio["valid/ex/reference1"] * 0.1 / 0.9, audio["valid/ex/mix"], rtol=1e-4, atol=1e-6)


def test_closing_the_run_log_closes_the_tensorboard_writer():
    """close() closes (and so flushes) the writer: the points since the last flush reach the event file."""
    run_log = RunLog(None)
    writer = run_log.writer = _Writer()
    run_log.close()
    assert writer.closed and not run_log.tensorboard

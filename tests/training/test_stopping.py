"""training/stopping.py: the summary of a run that stopped before its end."""

from __future__ import annotations

import torch

from mossformer2.distributed import DistInfo
from mossformer2.training.checkpointing import TrainState
from mossformer2.training.config import TrainerConfig
from mossformer2.training.stopping import StopController


def test_the_stop_summary_says_when_last_pt_holds_an_earlier_step(tmp_path):
    """After NaN steps last.pt was not updated: the summary must not claim the state at this step was saved."""
    stopper = StopController(TrainerConfig(max_steps=5), DistInfo(), torch.device("cpu"))
    state = TrainState(epoch=1, step=5, batches_done=2)
    assert stopper.should_stop(state)
    last = tmp_path / "last.pt"
    text = stopper.summary(state, epoch_batches=8, last=last, saved_step=3)
    assert f"{last} keeps step 3 (the later steps had NaN/inf losses)" in text and "state saved" not in text
    assert f"state saved to {last}" in stopper.summary(state, 8, last, saved_step=5)

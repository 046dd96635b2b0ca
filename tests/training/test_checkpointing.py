"""training/checkpointing.py: what a resume refuses, and the random streams of ranks the saved run lacked."""

from __future__ import annotations

import pytest
import torch

import mossformer2
from mossformer2.training import Trainer
from tests.conftest import make_train_config


def test_a_new_ranks_random_stream_depends_on_the_resume_step():
    """A rank the saved run lacked seeds from (seed, rank, step): resumed at another step (a second resume on more
    processes) it must not repeat the dropout masks it drew after the first."""
    from mossformer2.training.checkpointing import restore_rng_state, rng_state

    torch.manual_seed(11)
    saved = [rng_state()]
    restore_rng_state(saved, 1, seed=3, step=40)
    at_40 = torch.rand(4)
    restore_rng_state(saved, 1, seed=3, step=41)
    at_41 = torch.rand(4)
    restore_rng_state(saved, 1, seed=3, step=40)
    assert torch.equal(at_40, torch.rand(4))  # a function of them only
    assert not torch.equal(at_40, at_41)


def test_a_weights_only_last_pt_is_refused_as_not_resumable(train_corpus, tmp_path):
    """A best.pt / exported model put where last.pt belongs: a ValueError that says to use trainer.init_from, not a
    KeyError from deep inside the resume."""
    first = Trainer(make_train_config(train_corpus), tmp_path / "a", loaders=(None, None))
    first.close()
    exp = tmp_path / "exp"
    exp.mkdir()
    mossformer2.save_checkpoint(exp / "last.pt", first.model)  # weights (and model config) only
    with pytest.raises(ValueError, match=r"last\.pt is not a resumable training checkpoint \(missing "
                                         r"\['optimizer', 'scheduler', 'trainer_state', 'rng_states'\]\); use "
                                         r"trainer.init_from"):
        Trainer(make_train_config(train_corpus), exp, loaders=(None, None))

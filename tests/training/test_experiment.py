"""training/experiment.py: the experiment folder (a failed start, runs moved aside), resume warnings and the stop
signals."""

from __future__ import annotations

import logging
import os
import signal

import pytest

from mossformer2.training import Trainer
from mossformer2.training.experiment import stop_signals
from tests.conftest import make_train_config


def test_a_failed_start_keeps_an_experiment_folder_that_existed_before(train_corpus, tmp_path):
    """Only a folder the failed start created is removed: one the user made (empty) stays."""
    exp = tmp_path / "acc"
    exp.mkdir()
    with pytest.raises(ValueError, match="fewer than optim.accum_steps"):
        Trainer(make_train_config(train_corpus, "optim.accum_steps=9"), exp)  # fails after the folder's lock was taken
    assert exp.is_dir()


def test_a_fresh_run_moves_a_previous_runs_best_pt_aside_even_without_its_last_pt(tmp_path):
    from mossformer2.training.experiment import move_previous_run_aside

    (tmp_path / "best.pt").write_bytes(b"the previous run's best model")
    (tmp_path / "train.log").write_text("previous run\n")
    move_previous_run_aside(tmp_path, resume=True)
    [aside] = tmp_path.glob("replaced-*")
    assert (aside / "best.pt").read_bytes() == b"the previous run's best model"
    assert (aside / "train.log").is_file() and not (tmp_path / "best.pt").exists()


def test_two_runs_replaced_within_one_second_get_separate_folders(tmp_path, monkeypatch):
    from mossformer2.training import experiment

    monkeypatch.setattr(experiment.time, "strftime", lambda fmt, t=None: "20260101-000000")
    for text in ("first", "second"):
        (tmp_path / "last.pt").write_text(text)
        experiment.move_previous_run_aside(tmp_path, resume=False)
    folders = sorted(p.name for p in tmp_path.glob("replaced-*"))
    assert folders == ["replaced-20260101-000000", "replaced-20260101-000000-1"]
    assert [(tmp_path / f / "last.pt").read_text() for f in folders] == ["first", "second"]


def test_a_resume_before_any_validation_does_not_warn_about_a_best_score(train_corpus, tmp_path, caplog):
    """Changed validation settings make a warning about the best score so far only when there is one."""
    first = Trainer(make_train_config(train_corpus), tmp_path, loaders=(None, None))  # no epoch validated yet
    first.save_checkpoint(tmp_path / "last.pt")
    first.close()
    with caplog.at_level(logging.WARNING, logger="mossformer2.training"):
        Trainer(make_train_config(train_corpus, "data.dynamic_mixing.valid_examples=3"), tmp_path,
                loaders=(None, None)).close()
    assert "changed data settings: data.dynamic_mixing.valid_examples 2 -> 3" in caplog.text
    assert "the best score" not in caplog.text


def test_a_signal_ignored_before_fit_stays_ignored_during_it():
    """`nohup` / a background job starts with SIGINT ignored: a Ctrl-C meant for the shell must not stop the run."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    calls = []
    try:
        with stop_signals(calls.append):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
        assert calls == [] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)

"""DDP: two CPU processes (gloo) train in lockstep, equal to one process with the combined batch."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import socket
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from mossformer2.distributed import cleanup_distributed, init_distributed
from mossformer2.training import Trainer
from tests.conftest import make_train_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank: int, world_size: int, port: int):
    """Join the 2-process gloo group as torchrun would set it up; returns the DistInfo."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    return init_distributed("cpu")


def _fit_until_stopped(trainer: Trainer) -> int | None:
    """Train; the signal number if a SIGINT/SIGTERM stopped the run, else None."""
    from mossformer2.training.experiment import TrainingInterrupted

    try:
        trainer.fit()
    except TrainingInterrupted as stop:
        return stop.signum
    return None


def _worker(rank: int, world_size: int, port: int, train_corpus, exp_dir: str, overrides: list[str]) -> None:
    info = _join_group(rank, world_size, port)
    try:
        cfg = make_train_config(train_corpus, "model.dropout=0.0", "optim.accum_steps=1", "trainer.max_epochs=1",
                                *overrides)
        trainer = Trainer(cfg, exp_dir, dist_info=info)
        assert trainer.dist.rank == rank and trainer.dist.world_size == world_size
        state = trainer.fit()
        torch.save({"weights": trainer.model.state_dict(), "averaged": trainer.eval_model.state_dict(),
                    "step": state.step, "history": state.history, "skipped_files": state.skipped_files,
                    "valid_count": trainer.validate()["count"]}, os.path.join(exp_dir, f"result_{rank}.pt"))
    finally:
        cleanup_distributed()


def _signalled_worker(rank: int, world_size: int, port: int, train_corpus, exp_dir: str, overrides: list[str]) -> None:
    """Rank 1 alone gets SIGTERM inside its 2nd optimizer step (torchrun forwards signals to the ranks at slightly
    different times); each rank records the step it stopped at."""
    info = _join_group(rank, world_size, port)
    original, calls = Trainer._optimizer_step, [0]

    def step(self, bad):
        calls[0] += 1
        if rank == 1 and calls[0] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, bad)

    Trainer._optimizer_step = step
    try:
        cfg = make_train_config(train_corpus, "model.dropout=0.0", "optim.accum_steps=1", "trainer.max_epochs=1",
                                "trainer.checkpoint_every_steps=null", *overrides)
        trainer = Trainer(cfg, exp_dir, dist_info=info)
        signum = _fit_until_stopped(trainer)
        torch.save({"weights": trainer.model.state_dict(), "step": trainer.state.step, "signum": signum},
                   os.path.join(exp_dir, f"result_{rank}.pt"))
    finally:
        cleanup_distributed()


def _validation_signalled_worker(rank: int, world_size: int, port: int, train_corpus, exp_dir: str,
                                 overrides: list[str]) -> None:
    """Rank 1 alone gets SIGTERM while it scores its first validation batch (unless this run resumes). The ranks'
    validation shards differ (3 and 2 batches), and validation looks for the signal before every batch."""
    from mossformer2.training import trainer as trainer_module

    resuming = os.path.exists(os.path.join(exp_dir, "last.pt"))
    info = _join_group(rank, world_size, port)
    trainer_module.VALID_STOP_CHECK_EVERY = 1
    original_si_sdr, calls = trainer_module.si_sdr, [0]

    def signalled_si_sdr(*args, **kwargs):  # called once per validation batch
        calls[0] += 1
        if rank == 1 and calls[0] == 1 and not resuming:
            os.kill(os.getpid(), signal.SIGTERM)
        return original_si_sdr(*args, **kwargs)

    trainer_module.si_sdr = signalled_si_sdr
    try:
        cfg = make_train_config(train_corpus, "model.dropout=0.0", "optim.accum_steps=1", "trainer.max_epochs=1",
                                "trainer.checkpoint_every_steps=null", "data.valid_batch_size=1",
                                "data.dynamic_mixing.valid_examples=5", *overrides)
        trainer = Trainer(cfg, exp_dir, dist_info=info)
        signum = _fit_until_stopped(trainer)
        torch.save({"signum": signum, "step": trainer.state.step, "history": trainer.state.history},
                   os.path.join(exp_dir, f"result_{rank}.pt"))
    finally:
        cleanup_distributed()


def _train_two_ranks(train_corpus, exp_dir, *overrides: str, timeout: float = 180.0, worker=_worker) -> list[dict]:
    """Train with 2 gloo ranks and return each rank's results; a hang (ranks waiting in different collectives)
    fails the test after ``timeout`` seconds instead of waiting for gloo's 30-minute timeout (the runs take 5-25 s;
    the margin is for a loaded 2-core machine).

    A rank killed by SIGABRT ("terminate called without an active exception", a rare crash inside gloo's own
    threads, also seen in PyTorch's gloo tests) is retried once from the same starting folder: the Python-level
    collectives of both ranks were traced identical, so it is not a mismatch of ours. Any other failure fails."""
    exp_dir.mkdir(exist_ok=True)  # (an existing one: resumed)
    before = exp_dir.parent / f".{exp_dir.name}.before"
    shutil.rmtree(before, ignore_errors=True)
    shutil.copytree(exp_dir, before)
    for attempt in (1, 2):
        context = mp.spawn(worker, args=(2, _free_port(), train_corpus, str(exp_dir), list(overrides)), nprocs=2,
                           join=False)
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.kill()
                    pytest.fail(f"the 2-rank run did not finish in {timeout:.0f} s (hung?)")
            break
        except mp.ProcessExitedException as err:
            if attempt == 2 or err.signal_name != "SIGABRT":
                raise
            warnings.warn(f"a rank was killed by SIGABRT (gloo): retrying the 2-rank run once ({err})", stacklevel=2)
            shutil.rmtree(exp_dir)
            shutil.copytree(before, exp_dir)
    shutil.rmtree(before, ignore_errors=True)
    return [torch.load(exp_dir / f"result_{r}.pt", weights_only=True) for r in (0, 1)]


def test_two_process_gloo_matches_single_process(train_corpus, tmp_path):
    ddp_dir = tmp_path / "ddp"
    results = _train_two_ranks(train_corpus, ddp_dir, "data.batch_size=2", "trainer.ema_decay=0.5",
                               "trainer.log_every_steps=1")
    for key, value in results[0]["weights"].items():
        assert torch.equal(value, results[1]["weights"][key]), key  # ranks stay in lockstep
    assert results[0]["step"] == results[1]["step"] == 4  # 16 examples / (2 ranks x batch 2)
    assert results[0]["valid_count"] == 2.0  # validation shards summed over ranks, no duplicates
    assert (ddp_dir / "last.pt").is_file() and (ddp_dir / "best.pt").is_file()
    assert len(list((ddp_dir).glob("train.log"))) == 1

    # One process with batch 4 sees the same 4 examples per step (rank r takes every 2nd index).
    single_cfg = make_train_config(train_corpus, "model.dropout=0.0", "data.batch_size=4", "optim.accum_steps=1",
                                   "trainer.max_epochs=1", "trainer.ema_decay=0.5", "trainer.log_every_steps=1")
    single = Trainer(single_cfg, tmp_path / "single")
    single.fit()
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(results[0]["weights"][key], value, atol=2e-5, rtol=1e-4)
    # The weight average (trainer.ema_decay) is kept identically on every rank, as in one process.
    for key, value in single.ema.module.state_dict().items():
        assert torch.equal(results[0]["averaged"][key], results[1]["averaged"][key]), key
        torch.testing.assert_close(results[0]["averaged"][key], value, atol=2e-5, rtol=1e-4)
    # The logged train loss is the mean over both ranks' batches, as in one process (not rank 0's alone).
    train_losses = [r["history"][0]["train_loss"] for r in results]
    assert train_losses[0] == train_losses[1]
    assert math.isclose(train_losses[0], single.state.history[0]["train_loss"], rel_tol=1e-4)
    # So is each step's logged loss (it was rank 0's alone).
    step_losses = [[float(x) for x in re.findall(r"step \d+: loss (-?[\d.]+)", (folder / "train.log").read_text())]
                   for folder in (ddp_dir, tmp_path / "single")]
    assert len(step_losses[0]) == len(step_losses[1]) == 4
    for ddp_loss, single_loss in zip(*step_losses):
        assert abs(ddp_loss - single_loss) <= 0.0015


def test_a_rank_whose_batch_is_all_unreadable_files_keeps_step_with_the_others(train_corpus, tmp_path):
    """data.skip_bad_files: the rank whose batch is empty once hung the job in a collective of its own."""
    from tests.data.test_datasets import _make_wsj_folder

    folder = _make_wsj_folder(tmp_path / "wsj", [2000] * 8)
    (folder / "mix" / "u3.wav").write_bytes(b"not audio")  # on one rank only: batch 1, 2 ranks
    results = _train_two_ranks(train_corpus, tmp_path / "exp", "data.dynamic_mixing=null", f"data.train={folder}",
                               f"data.valid={folder}", "data.batch_size=1", "data.cache_audio=false",
                               "data.skip_bad_files=true")
    assert results[0]["step"] == results[1]["step"] == 4  # 8 examples / (2 ranks x batch 1)
    for key, value in results[0]["weights"].items():
        assert torch.equal(value, results[1]["weights"][key]), key
    assert all(math.isfinite(v) for v in results[0]["weights"]["enc.conv1d.weight"].flatten().tolist())
    assert sum(r["skipped_files"] for r in results) == 2  # once in training, once in validation
    assert "2 skipped file reads" in (tmp_path / "exp" / "train.log").read_text()  # counted over both ranks


def test_a_signal_that_reaches_one_rank_stops_all_ranks_at_the_same_step(train_corpus, tmp_path):
    results = _train_two_ranks(train_corpus, tmp_path / "exp", "data.batch_size=2", worker=_signalled_worker)
    assert [r["signum"] for r in results] == [signal.SIGTERM] * 2
    assert results[0]["step"] == results[1]["step"] == 2  # rank 1's step 2 finished, then both stopped
    for key, value in results[0]["weights"].items():
        assert torch.equal(value, results[1]["weights"][key]), key
    last = torch.load(tmp_path / "exp" / "last.pt", map_location="cpu", weights_only=True)
    assert last["step"] == 2 and len(last["rng_states"]) == 2 and last["trainer_state"]["world_size"] == 2
    assert "interrupted by SIGTERM at step 2" in (tmp_path / "exp" / "train.log").read_text()


def test_a_signal_during_validation_stops_every_rank_and_the_resumed_run_validates_in_full(train_corpus, tmp_path):
    """Validation looked at the stop flag only after it ended (minutes on a full cv set)."""
    exp = tmp_path / "exp"
    stopped = _train_two_ranks(train_corpus, exp, "data.batch_size=2", worker=_validation_signalled_worker)
    assert [r["signum"] for r in stopped] == [signal.SIGTERM] * 2
    assert [(r["step"], r["history"]) for r in stopped] == [(4, [])] * 2  # stopped in validation, before its end
    last = torch.load(exp / "last.pt", map_location="cpu", weights_only=True)
    assert (last["step"], last["epoch"], last["trainer_state"]["batches_done"]) == (4, 0, 4)  # not validated
    # Resumed: the unequal shards are validated in full (the signal checks stop at the smaller one: no hang).
    resumed = _train_two_ranks(train_corpus, exp, "data.batch_size=2", worker=_validation_signalled_worker)
    assert [r["signum"] for r in resumed] == [None] * 2
    assert resumed[0]["history"] == resumed[1]["history"] and len(resumed[0]["history"]) == 1


def test_torchruns_environment_is_read_strictly_except_in_signal_handlers(monkeypatch):
    from mossformer2.distributed import DistInfo

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert DistInfo.from_environment() == DistInfo(0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert DistInfo.from_environment() == DistInfo(3, 4, 1) and not DistInfo.from_environment().is_main
    monkeypatch.setenv("RANK", "")
    with pytest.raises(ValueError, match="RANK='' is not a whole number"):
        DistInfo.from_environment()
    # a signal handler must not fail: the stop it announces would become an exception at an arbitrary line
    assert DistInfo.from_environment(strict=False) == DistInfo(0, 4, 1)

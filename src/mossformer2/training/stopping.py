"""When training stops before its end: a step or time limit, SIGINT/SIGTERM, or divergence (NaN/inf steps).

Under DDP every rank must stop at the same optimizer step, but signals and clocks reach the ranks at slightly
different times. So the decision is one all-reduce of (time limit passed, SIGINT, SIGTERM) flags, which every rank
makes at the same points: once per optimizer step, after each validation, and every few validation batches.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Sized
from pathlib import Path

import torch

from mossformer2.distributed import DistInfo, all_reduce_sum
from mossformer2.training.checkpointing import TrainState
from mossformer2.training.config import TrainerConfig

log = logging.getLogger("mossformer2.training")


class TrainingDivergedError(ValueError):
    """``trainer.max_nonfinite_steps`` consecutive optimizer steps had a NaN/inf loss or gradient."""


class StopController:
    """Decides, identically on every rank, whether :meth:`Trainer.fit` stops now, and why.

    ``received_signal``: the SIGINT/SIGTERM this rank received (set by :meth:`request`, the signal handler's
    callback); ``agreed_signal``: the one all ranks stop for; ``reason``: why the run stopped (None: it did not).
    Limits: ``trainer.max_steps`` and ``trainer.max_minutes`` (counted from :meth:`start`).
    """

    def __init__(self, limits: TrainerConfig, dist: DistInfo, device: torch.device) -> None:
        self.max_steps, self.max_minutes = limits.max_steps, limits.max_minutes
        self.dist, self.device = dist, device
        self.start()

    def start(self) -> None:
        """A fit() begins: its time limit counts from now, and nothing is received or decided yet."""
        self._started, self._checked_at = time.monotonic(), None
        self.reason: str | None = None
        self.agreed_signal: int | None = None
        self.received_signal: int | None = None

    def request(self, signum: int) -> None:
        self.received_signal = signum

    def end(self) -> None:
        """fit() is over: a signal received or agreed on during it must not cut a later validate() short
        (``reason`` stays, for the record)."""
        self.received_signal = self.agreed_signal = None

    def should_stop(self, state: TrainState) -> bool:
        """A step or time limit reached, or SIGINT/SIGTERM received by some rank (sets ``reason``). Decided once per
        (epoch, step): a later call at the same point repeats the answer without a collective."""
        if self.reason is not None:
            return True
        if self._checked_at == (state.epoch, state.step):
            return False
        self._checked_at = (state.epoch, state.step)
        late, sigint, sigterm = self._flags()
        if self._note_signal(sigint, sigterm):
            return True
        if self.max_steps is not None and state.step >= self.max_steps:
            self.reason = f"trainer.max_steps ({self.max_steps}) reached"
        elif late:
            self.reason = f"trainer.max_minutes ({self.max_minutes:g}) reached"
        return self.reason is not None

    def signal_received(self) -> bool:
        """SIGINT/SIGTERM received by any rank (under DDP a collective: all ranks call it at the same points)."""
        _, sigint, sigterm = self._flags()
        return self._note_signal(sigint, sigterm)

    def validation_checks(self, valid_loader: Sized, every: int) -> tuple[int, float]:
        """(every, until): validation looks for a signal before each ``every``-th batch while fewer than ``until``
        have been read. Under DDP the ranks' shards may differ by a batch: checks stop at the smallest shard, so
        every rank makes the same all-reduces."""
        if not self.dist.is_distributed:
            return 1, math.inf  # a flag read, no collective
        counts = torch.zeros(self.dist.world_size, dtype=torch.float64, device=self.device)
        counts[self.dist.rank] = len(valid_loader)
        return every, float(all_reduce_sum(counts).min())

    def summary(self, state: TrainState, epoch_batches: int, last: Path, saved_step: int | None,
                resume: bool = True) -> str:
        """Why and where fit() stopped before the end, what ``last`` (last.pt, holding ``saved_step``) holds and how
        to go on (``resume``: the run's ``trainer.resume``; with false, the same command would start afresh)."""
        s = state
        if not s.batches_done:
            where = f"before epoch {s.epoch}"
        elif s.batches_done < epoch_batches:
            where = f"mid-epoch {s.epoch}"
        else:  # a signal in the epoch's last step or during its validation
            where = f"end of epoch {s.epoch}, before its validation"
        if saved_step == s.step:
            saved = f"state saved to {last}"
        elif saved_step is not None:
            saved = f"{last} keeps step {saved_step} (the later steps had NaN/inf losses)"
        else:
            saved = "nothing saved"
        how = ("raise trainer.max_steps (or set it to null) and run again to continue"
               if self.reason and self.reason.startswith("trainer.max_steps")
               else "run the same command to continue")
        if not resume:
            how += " with trainer.resume=true (trainer.resume=false would start afresh, moving this run aside)"
        return f"{self.reason} at step {s.step} ({where}): {saved}; {how}"

    def _flags(self) -> tuple[bool, bool, bool]:
        """(time limit passed, SIGINT, SIGTERM) on any rank: one all-reduce, which every rank must make."""
        late = self.max_minutes is not None and time.monotonic() - self._started > self.max_minutes * 60
        flags = [float(late), float(self.received_signal == signal.SIGINT),
                 float(self.received_signal == signal.SIGTERM)]
        if self.dist.is_distributed:
            flags = all_reduce_sum(torch.tensor(flags, device=self.device)).tolist()
        late, sigint, sigterm = (flag > 0 for flag in flags)
        return late, sigint, sigterm

    def _note_signal(self, sigint: bool, sigterm: bool) -> bool:
        """Record a signal some rank received as the reason to stop (it overrides a limit); True if there is one."""
        if sigint or sigterm:
            self.agreed_signal = signal.SIGINT if sigint else signal.SIGTERM
            self.reason = f"interrupted by {signal.Signals(self.agreed_signal).name}"
        return self.agreed_signal is not None


class DivergenceGuard:
    """Counts the optimizer steps skipped in a row for a NaN/inf loss or gradient (the same count on every rank:
    the finiteness checks are all-reduced), and ends the run after ``limit`` of them (None: never)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.streak = 0

    def step_taken(self) -> None:
        self.streak = 0

    def step_skipped(self, step: int, last: Path, saved_step: int | None) -> None:
        """Count skipped step number ``step``; raise :class:`TrainingDivergedError` once ``limit`` are in a row.
        ``last``: last.pt, which holds ``saved_step`` (None: this run wrote none)."""
        self.streak += 1
        n = self.streak
        if self.limit is None or n < self.limit:
            return
        if saved_step is not None:
            kept = f"{last} keeps step {saved_step}, before them"
            how = ("run again to resume from there (if it diverges again at once, start afresh with "
                   "trainer.resume=false)")
        else:
            kept, how = f"no {last.name} was written", "run again (it starts afresh)"
        message = (f"the model diverged: {n} optimizer steps in a row (steps {step + 1 - n}-{step}) had a NaN/inf "
                   f"loss or gradient (trainer.max_nonfinite_steps); {kept}. Lower optim.lr (or set "
                   f"optim.grad_clip) and {how}")
        log.error("%s", message)
        raise TrainingDivergedError(message)

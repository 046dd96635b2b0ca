"""Rank 0's record of a training run in its experiment folder: train.log (opening with the messages of the setup
before it), TensorBoard scalars and audio."""

from __future__ import annotations

import logging
import logging.handlers
import math
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("mossformer2.training")


class RunLog:
    """train.log and the TensorBoard writer of one run (rank 0's; on the other ranks nothing is opened and every
    call does nothing)."""

    def __init__(self, exp_dir: Path) -> None:
        self.exp_dir = exp_dir
        self.writer: Any = None  # a SummaryWriter once opened with TensorBoard
        self._file: logging.FileHandler | None = None
        self._setup: logging.handlers.MemoryHandler | None = None
        self._audio_logged: set[str] = set()  # validation examples whose mixture and references TensorBoard has

    @property
    def tensorboard(self) -> bool:
        return self.writer is not None

    def keep_setup_messages(self) -> None:
        """Keep the setup's messages (resume warnings, ...) for train.log, which is only made once setup succeeded."""
        self._setup = logging.handlers.MemoryHandler(capacity=10**6, flushLevel=logging.CRITICAL + 1)
        log.addHandler(self._setup)

    def open(self, tensorboard: bool, purge_step: int) -> None:
        """Open train.log (writing the setup's messages first) and, with ``tensorboard``, a writer that drops the
        points an interrupted run logged from ``purge_step`` on (they are logged again) instead of drawing them
        twice."""
        self._file = logging.FileHandler(self.exp_dir / "train.log")
        self._file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(self._file)
        if self._setup is not None:
            self._setup.setTarget(self._file)
            self._setup.flush()
            log.removeHandler(self._setup)
            self._setup = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.exp_dir / "tensorboard"), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def audio(self, name: str, mix: torch.Tensor, est: torch.Tensor, ref: torch.Tensor, step: int,
              sample_rate: int) -> None:
        """TensorBoard audio of validation example ``name``: the estimates ``est [S, T]`` (in the order of the
        references ``ref [S, T]``) at every validation; the mixture ``mix [T]`` and the references once per run
        (they do not change)."""
        if self.writer is None:
            return
        peak = float(torch.cat([mix.abs().flatten(), est.abs().flatten()]).max()) + 1e-8  # NaN / inf carry through
        if not math.isfinite(peak):
            return  # a diverged model (reported with the scores): NaN cannot be written as 16-bit audio
        if name not in self._audio_logged:  # the mixture and references at one level of their own
            self._audio_logged.add(name)
            level = float(torch.cat([mix.abs().flatten(), ref.abs().flatten()]).max()) + 1e-8
            self.writer.add_audio(f"valid/{name}/mix", (mix / level).cpu(), step, sample_rate=sample_rate)
            for s in range(ref.shape[0]):
                self.writer.add_audio(f"valid/{name}/reference{s + 1}", (ref[s] / level).cpu(), step,
                                      sample_rate=sample_rate)
        for s in range(est.shape[0]):
            self.writer.add_audio(f"valid/{name}/s{s + 1}", (est[s] / peak).cpu(), step, sample_rate=sample_rate)

    def error_line(self, message: str) -> None:
        """An ERROR line in train.log only (the exception itself reaches the terminal)."""
        if self._file is not None:
            self._file.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None))

    def close(self) -> None:
        """Flush and close the TensorBoard writer and train.log; drop setup messages not yet written (a failed
        start makes no train.log). Idempotent."""
        if self._setup is not None:
            log.removeHandler(self._setup)
            self._setup = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._file is not None:
            log.removeHandler(self._file)
            self._file.close()
            self._file = None

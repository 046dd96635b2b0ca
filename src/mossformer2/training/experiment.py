"""The experiment folder of one training run: its lock, the archive of a replaced run, and stop signals.

Kept apart from the training loop: these deal with the operating system (file locks, signals, renames), not with
the model or the data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mossformer2.distributed import DistInfo
from mossformer2.hub import TRAINER_BEST, TRAINER_LAST
from mossformer2.utils import make_folder

try:
    import fcntl
except ImportError:  # Windows: runs in one folder are not guarded against each other
    fcntl = None

log = logging.getLogger("mossformer2.training")

# The lock files this process holds open. A forked child (a DataLoader worker) inherits their descriptors, and
# flock holds while any copy is open: after a SIGKILL of the run its orphaned workers kept the folder locked for
# seconds, and a restart was refused. Each child points its copies at /dev/null (not closed: the file objects it
# inherited close these numbers later, which must not hit a file the child opened since). File objects, not
# numbers: a lock file closed some other way (a Trainer dropped without close()) is skipped, not a reused number.
_HELD_LOCK_FILES: weakref.WeakSet[Any] = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    files = [file for file in _HELD_LOCK_FILES if not file.closed]
    _HELD_LOCK_FILES.clear()
    if not files:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    for file in files:
        with contextlib.suppress(OSError):
            os.dup2(null, file.fileno())
    os.close(null)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


class ExperimentInUseError(OSError):
    """Another training run holds the experiment folder's lock."""


class TrainingInterrupted(KeyboardInterrupt):
    """:meth:`Trainer.fit` stopped by SIGINT or SIGTERM (``signum``) after an optimizer step, its state saved."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = int(signum)


class ExperimentLock:
    """An exclusive lock on an experiment folder for one training run: ``<exp-dir>/.lock`` (holding the pid) locked
    with ``flock``, which the OS drops when the process ends, however it ends (forked children drop their copies
    at once). Creates the folder. No lock where ``fcntl`` is missing (Windows) or the file system refuses locks."""

    def __init__(self, exp_dir: Path) -> None:
        self.created_folder = not exp_dir.exists()
        make_folder(exp_dir, "experiment folder")
        self.path = exp_dir / ".lock"
        self._file = None
        if fcntl is None:
            return
        file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held open for the whole run)
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            pid = file.read().strip() or "?"
            file.close()
            raise ExperimentInUseError(f"another training run (pid {pid}) is using {exp_dir}: wait for it to end "
                                       "or use another --exp-dir") from None
        except OSError as err:  # e.g. a network file system without locks
            file.close()
            log.warning("cannot lock %s (%s): a second run in this folder would not be stopped", self.path, err)
            return
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file
        _HELD_LOCK_FILES.add(file)

    def release(self, remove_created_folder: bool = False) -> None:
        """Unlock; ``remove_created_folder``: also remove the folder if this lock created it and it is empty again
        (a failed start leaves nothing behind)."""
        if remove_created_folder and self.created_folder:
            self.path.unlink(missing_ok=True)  # while still locked: no other run can have taken this file
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()
        if self._file is not None:
            _HELD_LOCK_FILES.discard(self._file)
            self._file.close()
            self._file = None


RUN_FILES = (TRAINER_LAST, TRAINER_BEST, "train.log", "config.yaml", "tensorboard")


def move_previous_run_aside(exp_dir: Path, resume: bool) -> None:
    """A fresh run in a folder that holds another run's checkpoints (``trainer.resume=false``, or nothing to resume
    from): move that run's :data:`RUN_FILES` to a new ``replaced-<UTC time>/`` folder rather than overwrite them or
    mix both runs' logs."""
    if not any((exp_dir / name).exists() for name in (TRAINER_LAST, TRAINER_BEST)):
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    folder, n = exp_dir / f"replaced-{stamp}", 1
    while folder.exists():
        folder, n = exp_dir / f"replaced-{stamp}-{n}", n + 1
    folder.mkdir()
    for name in RUN_FILES:
        if (exp_dir / name).exists():
            (exp_dir / name).rename(folder / name)
    why = "trainer.resume=false" if not resume else f"no {TRAINER_LAST} to resume from"
    log.warning("%s holds a previous run and this one starts afresh (%s): the previous run's files were moved "
                "to %s", exp_dir, why, folder)


@contextlib.contextmanager
def stop_signals(on_stop: Callable[[int], None]) -> Iterator[None]:
    """Within the block (main thread only), the first SIGINT/SIGTERM calls ``on_stop(signum)`` instead of ending
    the process, so the caller can stop at a safe point.

    Repeats within 2 s are ignored (torchrun passes the terminal's Ctrl-C on to workers that got it already); a
    later second signal acts at once through the handler that was there before (SIGINT: KeyboardInterrupt;
    SIGTERM: the process ends). A signal that was ignored before stays ignored. Forked processes (DataLoader
    workers) inherit the handler but ignore the signal: a terminal's Ctrl-C reaches them too, and they must keep
    serving batches until the step ends, not log the stop or call their copy of ``on_stop``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous = {sig: handler for sig, handler in previous.items()
                if handler is not None and handler is not signal.SIG_IGN}
    first_at: list[float] = []

    def handle(signum: int, frame: Any) -> None:
        if os.getpid() != owner:
            return
        if not first_at:
            first_at.append(time.monotonic())
            if DistInfo.from_environment(strict=False).is_main:  # under torchrun every rank gets it: one says so
                log.warning("%s received: stopping after the current optimizer step (a second one aborts at once)",
                            signal.Signals(signum).name)
            on_stop(signum)
        elif time.monotonic() - first_at[0] > 2.0:
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)

    for sig in previous:
        signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

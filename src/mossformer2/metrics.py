"""Separation quality metrics on numpy arrays, as published papers report them.

- ``si_sdr``: scale-invariant SDR (the formula of :mod:`mossformer2.losses`, in float64 NumPy): the zero-mean
  definition of the official recipe (estimate and reference have their means removed first);
- ``sdr``: BSS-eval v3 SDR (512-tap distortion filter, as ``mir_eval.separation.bss_eval_sources``), computed
  with ``fast_bss_eval``;
- ``pesq``: PESQ (ITU-T P.862.2 wide band at 16 kHz; narrow band P.862 at 8 kHz; :func:`pesq_mode`);
- ``stoi``: short-time objective intelligibility (pystoi).

:func:`score_separation` aligns estimates to references with the SI-SDR permutation (PIT) and scores every
metric in that single order, with improvements over the unprocessed mixture for SI-SDR and SDR.
"""

from __future__ import annotations

import atexit
import os
import pickle
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

METRICS = ("si_sdr", "sdr", "pesq", "stoi")
BSS_EVAL_FILTER_LENGTH = 512  # BSS-eval v3 default, as in mir_eval and the published wsj0-2mix SDR numbers
# fast_bss_eval's SDR of a (near-)perfect estimate is +inf; beyond 100 dB only rounding speaks, so cap there.
SDR_CLAMP_DB = 100.0
PESQ_MODES = {"nb": "narrow band (ITU-T P.862)", "wb": "wide band (ITU-T P.862.2)"}
PYSTOI_UNDEFINED = 1e-5  # what pystoi returns (with a warning) when too little speech is left to score


def _pair(est: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    est = np.ascontiguousarray(est, dtype=np.float64)
    ref = np.ascontiguousarray(ref, dtype=np.float64)
    if est.shape != ref.shape or est.ndim == 0:
        raise ValueError(f"estimate shape {est.shape} and reference shape {ref.shape} differ")
    if est.shape[-1] == 0:
        raise ValueError("cannot score empty signals")
    if not (np.isfinite(est).all() and np.isfinite(ref).all()):
        raise ValueError("signals contain NaN or infinite values")
    return est, ref


SI_SDR_EPS = 1e-8  # as mossformer2.losses.EPS: evaluation and training report the same numbers


def pairwise_si_sdr(est: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """SI-SDR in dB of every estimate against every reference. ``est`` ``[S_est, T]``, ``ref`` ``[S_ref, T]``
    -> ``[S_est, S_ref]``.

    The formula of :func:`mossformer2.losses.pairwise_si_sdr` (zero-mean, eps in the projection and the ratio),
    in float64 NumPy, so that scoring needs no torch (an ONNX deployment evaluates without it).
    """
    est, ref = np.asarray(est, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if est.ndim != 2 or ref.ndim != 2 or est.shape[-1] != ref.shape[-1]:
        raise ValueError(f"expected estimates [S_est, T] and references [S_ref, T], got shapes {est.shape} and "
                         f"{ref.shape}")
    est = est - est.mean(-1, keepdims=True)
    ref = ref - ref.mean(-1, keepdims=True)
    ref_energy = np.einsum("jt,jt->j", ref, ref)  # [S_ref]
    scale = (est @ ref.T) / (ref_energy + SI_SDR_EPS)  # [S_est, S_ref]
    target_energy = scale**2 * ref_energy
    # The residual taken explicitly, pair by pair: expanding |e - a r|^2 cancels badly for near-perfect estimates.
    noise_energy = np.array([[np.sum((e - a * r) ** 2) for a, r in zip(row, ref)] for e, row in zip(est, scale)])
    return 10 * np.log10(target_energy / (noise_energy + SI_SDR_EPS) + SI_SDR_EPS)


def si_sdr(est: np.ndarray, ref: np.ndarray) -> np.ndarray | float:
    """SI-SDR in dB of matching pairs. ``est``, ``ref``: ``[..., T]`` -> ``[...]`` (a float for ``[T]``)."""
    return _per_row(lambda e, r: pairwise_si_sdr(e[None], r[None])[0, 0], est, ref)


def sdr(est: np.ndarray, ref: np.ndarray, filter_length: int = BSS_EVAL_FILTER_LENGTH) -> np.ndarray | float:
    """BSS-eval v3 SDR in dB of matching pairs (estimate i against reference i, no permutation search).

    ``est``, ``ref``: ``[..., T]`` -> ``[...]``. The SDR only involves the projection of an estimate onto its
    own reference (and its delays up to ``filter_length``), so it is independent of the other references.
    Values are capped to +-100 dB (a perfect estimate would otherwise give +inf).
    """
    # fast_bss_eval's numpy backend trips over NumPy 2's linalg.solve broadcasting rules; its torch backend
    # computes the same thing (in float64 here).
    import torch
    from fast_bss_eval.torch import sdr_loss

    est, ref = _pair(est, ref)
    if est.shape[-1] < filter_length:
        raise ValueError(f"signals of {est.shape[-1]} samples are shorter than the BSS-eval filter "
                         f"({filter_length} taps)")
    if not (np.ptp(ref, axis=-1) > 0).all():  # its delays span nothing: torch's solver failed as "singular"
        raise ValueError("SDR is undefined for a silent reference (every sample equal)")

    def one(e: np.ndarray, r: np.ndarray) -> float:
        try:
            return float(-sdr_loss(torch.from_numpy(e)[None, None], torch.from_numpy(r)[None, None],
                                   filter_length=filter_length, clamp_db=SDR_CLAMP_DB)[0, 0])
        except torch.linalg.LinAlgError:  # e.g. a denormal reference: numerically silent
            raise ValueError("SDR is undefined for a numerically silent reference") from None

    # One pair a solve, on one thread: the solve of 512x512 systems hung in MKL (DLASWP error) after
    # torch.set_num_threads(n >= 2), as `evaluate --threads 2` sets it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _per_row(one, est, ref)
    finally:
        torch.set_num_threads(threads)


def _per_row(fn, est: np.ndarray, ref: np.ndarray) -> np.ndarray | float:
    est, ref = _pair(est, ref)
    if est.ndim == 1:
        return float(fn(est, ref))
    flat = [fn(e, r) for e, r in zip(est.reshape(-1, est.shape[-1]), ref.reshape(-1, ref.shape[-1]))]
    return np.asarray(flat, dtype=np.float64).reshape(est.shape[:-1])


def pesq_mode(sample_rate: int) -> str:
    """The PESQ mode :func:`pesq` scores a signal at ``sample_rate`` in: "nb" at 8 kHz, else "wb"."""
    return "nb" if sample_rate == 8000 else "wb"


def pesq(est: np.ndarray, ref: np.ndarray, sample_rate: int) -> np.ndarray | float:
    """PESQ MOS-LQO of matching pairs: wide band at 16 kHz, narrow band at 8 kHz (wide band needs 16 kHz).

    Other rates are resampled to 16 kHz (soxr) and scored wide band. ``[..., T]`` -> ``[...]``.
    The scores are computed in a child process (:class:`PesqProcess`): the pesq package crashes on some signals.
    """
    import pesq  # noqa: F401  (a missing package: an ImportError here, not a failed score in the child)

    mode = pesq_mode(sample_rate)
    if sample_rate not in (8000, 16000):
        from mossformer2.audio import resample

        def to_16k(x: np.ndarray) -> np.ndarray:  # any leading axes ([..., T]; resample takes [C, T])
            x = np.asarray(x, dtype=np.float32)
            return resample(x.reshape(-1, x.shape[-1]), sample_rate, 16000).reshape(*x.shape[:-1], -1)

        est, ref = to_16k(est), to_16k(ref)
        sample_rate = 16000

    def one(e: np.ndarray, r: np.ndarray) -> float:
        if not np.abs(r).max() > 0:
            raise ValueError("PESQ failed: the reference is silent")
        if not np.abs(e).max() > 0:  # the pesq package itself fails with "cannot convert float NaN to integer"
            raise ValueError("PESQ failed: the estimate is silent")
        return _PESQ_PROCESS.score(sample_rate, r, e, mode)

    return _per_row(one, est, ref)


class PesqProcess:
    """PESQ scores computed by a child Python process, started on first use and kept for the next scores.

    The pesq package (0.0.4, the latest) crashes with a segmentation fault when its utterance detection finds more
    than about 50 utterances in a signal (36 s of short bursts, or a few minutes of speech with pauses): in the
    process that called it, that ended ``mossformer2 evaluate`` with every score of the run. Here the crash fails
    that one score (ValueError) and the next score starts a new child. (A subprocess, not multiprocessing:
    spawning imports the caller's main script again, and forking a process with torch threads is unsafe.)
    """

    def __init__(self) -> None:
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()
        atexit.register(self.close)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def score(self, sample_rate: int, ref: np.ndarray, est: np.ndarray, mode: str) -> float:
        with self._lock:
            child = self._child if self._child is not None and self._child.poll() is None else self._start()
            try:
                pickle.dump((sample_rate, ref, est, mode), child.stdin)
                child.stdin.flush()
                ok, value = pickle.load(child.stdout)
            except (EOFError, OSError, pickle.UnpicklingError):
                code = self._stop()
                raise ValueError(f"PESQ failed: the pesq package crashed on this {ref.size / sample_rate:.0f} s signal "
                                 f"(exit {code}; it does where it finds more than about 50 utterances: score "
                                 "shorter excerpts)") from None
            except BaseException:  # Ctrl-C while it scores: its late reply would answer the next request
                self._stop()
                raise
        if not ok:
            raise ValueError(value)
        return float(value)

    def _start(self) -> subprocess.Popen:
        """A new child, once it has imported the pesq package and said so (else ValueError, its error above)."""
        package_parent = str(Path(__file__).resolve().parents[1])  # this mossformer2, however it was imported
        command = (f"import sys; sys.path.insert(0, {package_parent!r}); "
                   "from mossformer2.metrics import serve_pesq; serve_pesq()")
        try:
            child = subprocess.Popen([sys.executable, "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError as err:  # no Python at sys.executable (an embedded interpreter)
            raise ValueError(f"PESQ failed: cannot start its child process with {sys.executable!r}: {err}") from None
        self._child = child
        try:
            pickle.load(child.stdout)  # "ready"
        except (EOFError, OSError, pickle.UnpicklingError):
            code = self._stop()
            raise ValueError(f"PESQ failed: its child process did not start (exit {code}; {sys.executable} with "
                             "mossformer2 and pesq importable?)") from None
        return child

    def _stop(self) -> int | None:
        """Kill the child (if still there) and close its pipes; its exit code."""
        child, self._child = self._child, None
        if child is None:
            return None
        child.kill()
        code = child.wait()
        child.stdin.close()
        child.stdout.close()
        return code

    def _forget(self) -> None:
        """In a forked copy: the child and its lock are the parent's (a thread may have held the lock)."""
        if self._child is not None:
            self._child.stdin.close()  # (its end of the pipe: the parent's child then ends with the parent)
            self._child.stdout.close()
            self._child.returncode = 0  # not this process's child: nothing to wait for, or to warn about
        self._child, self._lock = None, threading.Lock()

    def close(self) -> None:
        """End the child (also at exit: a score still being computed is of no use then; a forked copy has
        forgotten its parent's)."""
        self._stop()


def serve_pesq() -> None:
    """The child of :class:`PesqProcess`: says it is ready, then reads pickled ``(rate, ref, est, mode)`` from
    standard input until it closes and writes ``(True, score)`` or ``(False, message)``. Its own standard output
    goes to standard error first, so that nothing printed mixes with the replies; Ctrl-C is left to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests, replies = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    from pesq import PesqError
    from pesq import pesq as pesq_package

    try:
        pickle.dump("ready", replies)
        replies.flush()
        while True:
            try:
                sample_rate, ref, est, mode = pickle.load(requests)
            except EOFError:
                return
            try:
                reply = (True, pesq_package(sample_rate, ref, est, mode))
            except PesqError as err:  # e.g. no speech found in a silent reference
                reply = (False, f"PESQ failed: {type(err).__name__}: {err}")
            pickle.dump(reply, replies)
            replies.flush()
    except BrokenPipeError:  # the parent is gone or gave up on this score
        return


_PESQ_PROCESS = PesqProcess()


def stoi(est: np.ndarray, ref: np.ndarray, sample_rate: int, extended: bool = False) -> np.ndarray | float:
    """STOI (or extended STOI) of matching pairs, 0..1. ``[..., T]`` -> ``[...]``."""
    from pystoi import stoi as pystoi_stoi

    def one(e: np.ndarray, r: np.ndarray) -> float:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = pystoi_stoi(r, e, sample_rate, extended=extended)
        # pystoi only warns, and returns 1e-5, when fewer than 30 frames of speech (~0.4 s) are left after its
        # silence removal: a sentinel, not a score.
        if value == PYSTOI_UNDEFINED and any("Not enough STFT frames" in str(w.message) for w in caught):
            raise ValueError("STOI undefined: fewer than 30 frames (~0.4 s) of speech in the reference")
        return value

    return _per_row(one, est, ref)


def parse_metrics(metrics: str | Iterable[str]) -> tuple[str, ...]:
    """``"si_sdr,sdr"`` or an iterable of names -> validated tuple (order kept, duplicates dropped)."""
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {unknown or names}: choose from {', '.join(METRICS)}")
    return tuple(dict.fromkeys(names))


# The packages each metric needs beyond numpy and scipy; sdr runs fast_bss_eval's torch backend.
_METRIC_PACKAGES = {"pesq": ("pesq",), "stoi": ("pystoi",), "sdr": ("torch", "fast_bss_eval")}


def missing_package(metric: str) -> str | None:
    """The first package ``metric`` needs that is not installed, else None."""
    import importlib.util

    for package in _METRIC_PACKAGES.get(metric, ()):
        try:
            if importlib.util.find_spec(package) is not None:
                continue
        except ImportError:  # an import hook refusing the package: as good as not installed
            pass
        return package
    return None


def installed_metrics() -> tuple[str, ...]:
    """The metrics whose packages are installed (``mossformer2 evaluate``'s default)."""
    return tuple(name for name in METRICS if missing_package(name) is None)


def missing_package_advice(metric: str, package: str) -> str:
    """What to install for ``metric``, which needs ``package``."""
    if package == "torch":
        return f"metric {metric!r} needs PyTorch (pip install torch)"
    install = (f"pip install 'mossformer2[quality]' (or pip install {package})" if metric in ("pesq", "stoi")
               else f"pip install {package}")
    return f"metric {metric!r} needs the {package} package: {install}"


def check_metric_dependencies(metrics: Iterable[str]) -> None:
    """Raise ValueError naming the pip package for any selected metric whose library is not installed."""
    for name in metrics:
        package = missing_package(name)
        if package is not None:
            others = " (si_sdr, pesq and stoi score without it)" if package == "torch" else ""
            raise ValueError(f"{missing_package_advice(name, package)}, or leave {name} out of --metrics{others}")


def score_separation(est: np.ndarray, ref: np.ndarray, mix: np.ndarray, sample_rate: int,
                     metrics: str | Iterable[str] = METRICS, score_rate: int | None = None) -> dict:
    """Score separated speakers against references, after PIT alignment.

    ``est``, ``ref``: ``[S, T]``; ``mix``: ``[T]``, all at ``sample_rate``. With ``score_rate`` set (e.g. 8000
    to compare with published 8 kHz numbers), all three are resampled with soxr before scoring.
    Returns a dict: ``permutation`` (list: estimate i matches reference ``permutation[i]``, chosen by
    SI-SDR), then per metric the mean over speakers (``si_sdr``, ``sdr``, ``pesq``, ``stoi``), the
    improvements over the mixture ``si_sdri`` and ``sdri``, the per-speaker values under ``per_speaker``, and
    ``errors``: metric -> reason for each metric undefined on this mixture (PESQ of a silent estimate, STOI of
    less than ~0.4 s of speech), whose keys are then left out; the other metrics are still scored.

    Raises ValueError for inputs no metric can score: mismatched shapes, non-finite values, a silent reference.
    """
    names = parse_metrics(metrics)
    est = np.asarray(est, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    mix = np.asarray(mix, dtype=np.float64)
    if est.ndim != 2 or ref.ndim != 2 or mix.ndim != 1:
        raise ValueError(f"expected est [S, T], ref [S, T] and mix [T]; got shapes {est.shape}, {ref.shape}, "
                         f"{mix.shape}")
    if est.shape[0] != ref.shape[0]:
        raise ValueError(f"{est.shape[0]} estimated speakers but {ref.shape[0]} references")
    if not est.shape[1] == ref.shape[1] == mix.shape[0]:
        raise ValueError(f"lengths differ: estimates {est.shape[1]}, references {ref.shape[1]}, mixture "
                         f"{mix.shape[0]} samples")
    if score_rate is not None and score_rate != sample_rate:
        from mossformer2.audio import resample

        est, ref, mix = (resample(x.astype(np.float32), sample_rate, score_rate).astype(np.float64)
                         for x in (est, ref, mix))
        sample_rate = score_rate
    _pair(est, ref)
    _pair(mix, ref[0])
    silent = [k + 1 for k, r in enumerate(ref) if not np.abs(r - r.mean()).max() > 0]
    if silent:
        raise ValueError(f"reference {', '.join(map(str, silent))} is silent: no separation metric is defined")

    from scipy.optimize import linear_sum_assignment

    rows, perm = linear_sum_assignment(pairwise_si_sdr(est, ref), maximize=True)  # estimate i -> reference perm[i]
    aligned = np.empty_like(est)
    aligned[perm] = est[rows]  # reference order
    mix_as_est = np.broadcast_to(mix, ref.shape)

    def with_improvement(metric) -> dict[str, np.ndarray]:
        value = metric(aligned, ref)
        return {"": value, "i": value - metric(mix_as_est, ref)}

    scorers = {
        "si_sdr": lambda: with_improvement(si_sdr),
        "sdr": lambda: with_improvement(sdr),
        "pesq": lambda: {"": pesq(aligned, ref, sample_rate)},
        "stoi": lambda: {"": stoi(aligned, ref, sample_rate)},
    }
    per_speaker: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    for name in names:
        try:
            values = scorers[name]()
        except ValueError as err:  # undefined for this mixture only: the other metrics still count
            errors[name] = str(err)
            continue
        for suffix, value in values.items():
            per_speaker[name + suffix] = [float(v) for v in np.atleast_1d(value)]

    result: dict = {"permutation": [int(p) for p in perm]}
    for key, values in per_speaker.items():
        result[key] = float(np.mean(values))
    result["per_speaker"] = per_speaker
    result["errors"] = errors
    return result

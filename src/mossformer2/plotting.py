"""Spectrogram figures of a mixture and its separated speakers (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from mossformer2.utils import atomic_path


def require_matplotlib() -> None:
    """Raise ModuleNotFoundError saying what to install when matplotlib is missing (a minimal deployment), so that
    a plot is refused before the work, not after it."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ModuleNotFoundError("spectrogram plots need matplotlib: pip install matplotlib", name="matplotlib")


def plot_separation(mixture: np.ndarray, sources: np.ndarray, sample_rate: int, path: str | Path,
                    title: str | None = None, temp: Path | None = None) -> Path:
    """Write a PNG with log-magnitude spectrograms: mixture ``[T]`` on top, then each source of ``[S, T]``.

    ``temp``: write there instead, a temporary file the caller renames onto ``path`` (``atomic_paths``, for a plot
    that appears together with the audio files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.signal import stft

    rows = [("mixture", np.asarray(mixture, dtype=np.float32))]
    rows += [(f"speaker {k + 1}", np.asarray(s, dtype=np.float32)) for k, s in enumerate(sources)]
    nperseg = min(512, max(16, int(0.032 * sample_rate)))
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 2.2 * len(rows)), sharex=True, squeeze=False)
    try:
        for ax, (label, wave) in zip(axes[:, 0], rows):
            freqs, times, spec = stft(wave, fs=sample_rate, nperseg=min(nperseg, wave.shape[-1]))
            db = 20 * np.log10(np.abs(spec) + 1e-8)
            vmax = float(db.max())
            ax.pcolormesh(times, freqs / 1000, db, shading="auto", cmap="magma", vmin=vmax - 80, vmax=vmax)
            ax.set_ylabel(f"{label}\nkHz")
        axes[-1, 0].set_xlabel("time (s)")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path = Path(path)
        try:
            with atomic_path(path) if temp is None else contextlib.nullcontext(temp) as tmp:
                fig.savefig(tmp, format="png", dpi=80)
        except OSError as err:  # the system's message names the temp file, or no file ("No space left on device")
            if err.strerror is None:  # ours (a folder that cannot be made): it names the path already
                raise
            named = OSError(f"cannot write {path}: {err.strerror}")
            named.errno = err.errno  # still tells ENOSPC apart; a one-argument OSError prints no "[Errno 28]"
            raise named from None
    finally:
        plt.close(fig)
    return path

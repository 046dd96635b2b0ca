"""The files a separation writes: ``<stem>_s1.<ext>``, ``<stem>_s2.<ext>``, ... and ``<stem>_spectrogram.png``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mossformer2.audio import fit_to_full_scale, resample, to_mono, write_audio
from mossformer2.utils import atomic_paths

OUTPUT_FORMATS = ("wav", "flac")


def output_paths(input_path: str | Path, out_dir: str | Path, num_spks: int, format: str | None = None) -> list[Path]:
    """``out_dir/<stem>_s1.<ext>`` ... for an input file; ext from ``format``, the input (wav/flac) or wav."""
    input_path = Path(input_path)
    if format is not None and format.lower() not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {list(OUTPUT_FORMATS)}, got {format!r}")
    ext = (format or input_path.suffix.lstrip(".")).lower()
    if ext not in OUTPUT_FORMATS:
        ext = "wav"
    return [Path(out_dir) / f"{input_path.stem}_s{k + 1}.{ext}" for k in range(num_spks)]


def spectrogram_path(first_output: str | Path) -> Path:
    """``<stem>_spectrogram.png`` beside ``<stem>_s1.<ext>``."""
    first_output = Path(first_output)
    return first_output.with_name(first_output.stem.rsplit("_s1", 1)[0] + "_spectrogram.png")


def output_files(speaker_paths: Sequence[Path], plot: bool) -> list[Path]:
    """Every file a separation writes: the speaker files, and with ``plot`` the spectrogram after them."""
    return [*speaker_paths, spectrogram_path(speaker_paths[0])] if plot else list(speaker_paths)


def write_separation(paths: Sequence[Path], sources: np.ndarray, sample_rate: int, subtype: str = "PCM_16",
                     plot_mixture: tuple[np.ndarray, int] | None = None, title: str | None = None) -> list[Path]:
    """Write ``sources[k]`` (``[T]`` or ``[C, T]``) to ``paths[k]`` and, given ``(mixture [C, T], its rate)``,
    the spectrogram PNG (``spectrogram_path``): all of them appear together or none does. Outputs louder than
    full scale are scaled down together (``fit_to_full_scale``), never clipped. Returns the paths written."""
    paths = [Path(p) for p in paths]
    if len(paths) != len(sources):  # else a missing speaker would appear as an empty file, extra ones vanish
        raise ValueError(f"{len(sources)} separated sources for {len(paths)} output paths")
    sources = fit_to_full_scale(np.asarray(sources, dtype=np.float32), subtype, ", ".join(p.name for p in paths))
    targets = output_files(paths, plot_mixture is not None)
    with atomic_paths(targets) as temps:
        for tmp, path, source in zip(temps, paths, sources):
            write_audio(path, source, sample_rate, subtype=subtype, temp=tmp)
        if plot_mixture is not None:
            write_spectrogram(targets[-1], sources, sample_rate, *plot_mixture, title=title, temp=temps[-1])
    return targets


def write_spectrogram(path: Path, sources: np.ndarray, sample_rate: int, mixture: np.ndarray, mixture_rate: int,
                      title: str | None = None, temp: Path | None = None) -> Path:
    """The spectrogram PNG of a mixture ``[C, T]`` at ``mixture_rate`` and its separated ``sources`` (``[S, T]``,
    or ``[S, C, T]``, shown mixed down) at ``sample_rate``; ``temp`` as in ``plot_separation``."""
    from mossformer2.plotting import plot_separation

    mono = resample(to_mono(mixture), mixture_rate, sample_rate)
    speakers = sources if sources.ndim == 2 else sources.mean(axis=1)
    return plot_separation(mono, speakers, sample_rate, path, title=title, temp=temp)

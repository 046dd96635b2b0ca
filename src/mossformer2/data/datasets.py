"""Datasets of pre-mixed mixtures (wsj0-2mix folders, LibriMix CSV, scp lists) and the shared audio store.

An example is a dict ``{"id": str, "mix": Tensor[T], "sources": Tensor[S, T], "skipped": int}`` or ``None``
when its files are unreadable and bad files are skipped (the collate function drops and counts it).

Randomness (crop offsets, mixing choices) comes from ``numpy.random.default_rng([seed, epoch, index])``: an
example depends only on the seed, the epoch and its index, never on the worker that builds it, so runs with
any ``num_workers`` see the same data and a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mossformer2.audio import audio_header, read_audio, resample, resampled_length, to_mono
from mossformer2.data.manifests import MixtureEntry
from mossformer2.utils import bar_disabled

log = logging.getLogger(__name__)


class BadAudioError(ValueError):
    """An audio file could not be used; the message names it."""


class AudioStore:
    """Reads files as mono float32 ``[T]`` at ``sample_rate``; optionally keeps decoded audio in memory.

    With ``cache=True`` call :meth:`preload` before the DataLoader starts its workers: forked workers then share
    the decoded arrays instead of each decoding the corpus again.
    """

    def __init__(self, sample_rate: int, cache: bool = False, progress: bool | None = True) -> None:
        self.sample_rate = sample_rate
        self.cache = cache
        self.progress = progress  # the "loading audio" bar of preload (off on ranks other than 0; None: terminal)
        self._cache: dict[str, np.ndarray] = {}

    def load(self, path: str | Path) -> np.ndarray:
        key = str(path)
        if key in self._cache:
            return self._cache[key]
        try:
            wave, sr = read_audio(path)
            wave = to_mono(wave)
            if sr != self.sample_rate:
                wave = resample(wave, sr, self.sample_rate)
        except (OSError, ValueError, RuntimeError) as err:
            raise BadAudioError(f"cannot use audio file {path}: {err}") from err
        wave = np.ascontiguousarray(wave, dtype=np.float32)
        if not np.isfinite(wave).all():
            raise BadAudioError(f"cannot use audio file {path}: it contains NaN or infinite samples")
        if self.cache:
            self._cache[key] = wave
        return wave

    def preload(self, paths: Iterable[str | Path], skip_bad_files: bool) -> set[str]:
        """Decode ``paths`` into the cache (with a bar if the store's ``progress``); return the bad ones (raise on
        the first unless ``skip_bad_files``)."""
        from tqdm import tqdm

        paths = list(dict.fromkeys(str(p) for p in paths))
        bad: set[str] = set()
        for path in tqdm(paths, desc="loading audio", unit="file", disable=bar_disabled(self.progress), leave=False):
            try:
                self.load(path)
            except BadAudioError as err:
                if not skip_bad_files:
                    raise
                log.warning("skipping %s", err)
                bad.add(path)
        return bad


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one example: a function of (seed, epoch, index) only."""
    return np.random.default_rng([seed, epoch, index])


def is_silent(wave: np.ndarray) -> bool:
    """A constant wave (zeros, or a DC level): as a target it has no signal, and SI-SDR would score its eps."""
    return not np.ptp(wave) > 0


def active_span(waves: np.ndarray) -> tuple[int, int]:
    """``(start, end)``: from the first to past the last sample where every one of ``waves`` ``[S, T]`` has had
    and will have audio, i.e. the span they share once leading and trailing digital silence is set aside (a "max"
    set's zero padding); ``(0, T)`` when they share none."""
    total = waves.shape[-1]
    active = waves != 0
    firsts = active.argmax(-1)  # (0 for an all-zero row: such sources are refused before cropping)
    lasts = total - active[..., ::-1].argmax(-1)
    start, end = int(firsts.max()), int(lasts.min())
    return (start, end) if start < end else (0, total)


def random_crop(waves: np.ndarray, length: int, rng: np.random.Generator,
                span: tuple[int, int] | None = None) -> np.ndarray:
    """Crop ``waves`` ``[..., T]`` to ``length`` at one random offset; a shorter one is returned whole: the
    collate function pads the batch and keeps each item's true length, which the model and the loss take (zeros
    padded here would count in the SI-SDR loss, and the network would normalise over them).

    With ``span = (start, end)`` the window stays inside it, or holds all of it when it is shorter: a crop from the
    zero padding of a "max" set's shorter source would have no target (its SI-SDR a constant, no gradient)."""
    total = waves.shape[-1]
    if total <= length:
        return waves
    low, high = 0, total - length
    if span is not None:
        start, end = span
        low, high = (start, end - length) if end - start >= length else (max(end - length, 0), min(start, high))
    offset = int(rng.integers(low, high + 1))
    return waves[..., offset:offset + length]


def header_problems(entries: list[MixtureEntry], sample_rate: int) -> tuple[dict[str, str], Counter]:
    """What the headers of each mixture's files show (libsndfile's, no decoding) that would fail or mislead
    training: ``({mixture id: reason}, {sample rate: number of files})``. Reasons: a source with several channels
    (a reference is one speaker in one channel: averaging could train on both speakers), lengths that differ at
    ``sample_rate`` (a truncated file). Files libsndfile cannot read are left to the loading, which decodes them
    otherwise or names them."""
    problems: dict[str, str] = {}
    rates: Counter = Counter()
    headers: dict[Path, Any] = {}
    for entry in entries:
        paths = (entry.mix, *entry.sources)
        for path in paths:
            if path not in headers:
                headers[path] = audio_header(path)
                if headers[path] is not None:
                    rates[int(headers[path].samplerate)] += 1
        infos = [headers[path] for path in paths]
        stereo = next((k for k, info in enumerate(infos[1:]) if info is not None and info.channels > 1), None)
        if stereo is not None:
            problems[entry.id] = (f"source {stereo + 1} {entry.sources[stereo]} has {infos[stereo + 1].channels} "
                                  "channels: a reference must be one speaker in one channel (mono)")
            continue
        known = [(path, info) for path, info in zip(paths, infos) if info is not None]
        lengths = [resampled_length(info.frames, info.samplerate, sample_rate) for _, info in known]
        if len(set(lengths)) > 1:
            listed = ", ".join(f"{path.parent.name}/{path.name} {n}" for (path, _), n in zip(known, lengths))
            problems[entry.id] = (f"lengths differ at {sample_rate} Hz ({listed} samples): a truncated file or "
                                  "another sample rate?")
    return problems, rates


class MixtureDataset(Dataset):
    """Pre-mixed mixtures from a manifest.

    ``segment_samples`` set: a random crop of that length with the same offset for mix and sources (a shorter
    utterance whole: the batch is padded with true lengths) — training. ``segment_samples=None``: the full utterance
    (cut to ``max_samples`` from its start when given) — validation. Mixture and sources must have equal lengths
    (after resampling to the store's rate): a mismatch is a bad example (an error, or skipped with
    ``skip_bad_files``). The file headers are checked when the dataset is made (:func:`header_problems`), so that
    such a file fails the setup rather than a run hours in; ``file_rates`` counts the files at each sample rate
    (others than the store's are resampled).
    """

    def __init__(self, entries: list[MixtureEntry], store: AudioStore, segment_samples: int | None = None,
                 max_samples: int | None = None, seed: int = 0, skip_bad_files: bool = False) -> None:
        if not entries:
            raise ValueError("the dataset has no mixtures")
        num_spks = {len(e.sources) for e in entries}
        if len(num_spks) != 1:
            raise ValueError(f"mixtures have different numbers of sources: {sorted(num_spks)}")
        self.entries = entries
        self.num_spks = num_spks.pop()
        self.store = store
        self.segment_samples = segment_samples
        self.max_samples = max_samples
        self.seed = seed
        self.skip_bad_files = skip_bad_files
        self.epoch = 0
        self.preload_skipped = 0  # unreadable files dropped while the cache loaded (the trainer reports them)
        problems, self.file_rates = header_problems(entries, store.sample_rate)
        if problems:
            shown = "; ".join(f"mixture {name}: {reason}" for name, reason in list(problems.items())[:3])
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            if not skip_bad_files:
                raise ValueError(f"{len(problems)} of {len(entries)} mixtures cannot be used: {shown}{more}; fix "
                                 "them, or skip such mixtures with data.skip_bad_files=true")
            log.warning("skipping %d of %d mixtures: %s%s", len(problems), len(entries), shown, more)
            entries = [e for e in entries if e.id not in problems]
            if not entries:
                raise ValueError("every mixture has a file that cannot be used")
            self.entries = entries
        if store.cache:
            bad = store.preload([p for e in entries for p in (e.mix, *e.sources)], skip_bad_files)
            self.preload_skipped = len(bad)
            if bad:
                self.entries = [e for e in entries if not ({str(e.mix), *map(str, e.sources)} & bad)]
                log.warning("skipped %d of %d mixtures with unreadable files", len(entries) - len(self.entries),
                            len(entries))
                if not self.entries:
                    raise ValueError("every mixture has an unreadable file")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict | None:
        entry = self.entries[index]
        try:
            mix = self.store.load(entry.mix)
            sources = [self.store.load(p) for p in entry.sources]
            for k, (path, source) in enumerate(zip(entry.sources, sources)):
                if source.shape[-1] != mix.shape[-1]:
                    # A truncated file or one at another sample rate: zero-padding it would train on wrong targets.
                    raise BadAudioError(f"lengths differ at {self.store.sample_rate} Hz: mixture {entry.mix} has "
                                        f"{mix.shape[-1]} samples, source {k + 1} {path} {source.shape[-1]} (a "
                                        "truncated file or another sample rate?)")
                if is_silent(source):  # (evaluate refuses such references too)
                    raise BadAudioError(f"source {k + 1} {path} is silent (every sample is {source[0]:g}): there is "
                                        "nothing to separate it from")
        except BadAudioError as err:
            if not self.skip_bad_files:
                raise BadAudioError(f"mixture {entry.id}: {err}; fix it, or skip such mixtures with "
                                    "data.skip_bad_files=true") from err
            log.warning("skipping mixture %s: %s", entry.id, err)
            return None
        stacked = np.stack([mix, *sources])  # [1 + S, T]
        if self.segment_samples is not None:
            stacked = random_crop(stacked, self.segment_samples, example_rng(self.seed, self.epoch, index),
                                  active_span(stacked[1:]))
        elif self.max_samples is not None:
            stacked = stacked[:, :self.max_samples]
        stacked = torch.from_numpy(np.ascontiguousarray(stacked))
        return {"id": entry.id, "mix": stacked[0], "sources": stacked[1:], "skipped": 0}

"""Dynamic mixing: new mixtures of single-speaker utterances every epoch.

Utterance lists are a folder ``<root>/<speaker>/*.wav`` (any audio type libsndfile reads, searched recursively
under each speaker folder) or a text file with ``path speaker`` per line (``#`` comments; relative paths are
resolved against the list's folder).

Each mixture takes ``num_spks`` *different* speakers, one random utterance each, an optional speed factor
(soxr resampling), a random gain in dB around equal RMS, an optional random polarity per source, and optional
noise from a noise list at a random SNR.
Everything is drawn from ``default_rng([seed, epoch, index])`` so that an example does not depend on the worker
that builds it. Validation datasets (``fixed=True``) ignore the epoch: the same mixtures every epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
import torch
from torch.utils.data import Dataset

from mossformer2.audio import find_audio_files, mean_square, speaker_folders
from mossformer2.data.datasets import (
    AudioStore,
    BadAudioError,
    active_span,
    example_rng,
    is_silent,
    random_crop,
)
from mossformer2.data.manifests import list_file_lines, resolve_listed_path

log = logging.getLogger(__name__)

EPS = 1e-8


@dataclass(frozen=True)
class Utterance:
    path: Path
    speaker: str


def load_utterances(source: str | Path | list[str] | list[Path]) -> list[Utterance]:
    """Single-speaker utterances from a ``<root>/<speaker>/`` folder or a ``path speaker`` list (or several)."""
    if isinstance(source, (list, tuple)):
        return [u for item in source for u in load_utterances(item)]
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"utterance list or folder not found: {path}")
    if path.is_dir():
        speakers = speaker_folders(path)
        utterances = [Utterance(f, spk.name) for spk in speakers for f in find_audio_files(spk)]
        if not utterances:
            raise ValueError(f"{path} holds no audio in speaker folders: expected <root>/<speaker>/*.wav")
        return utterances
    utterances = []
    for number, line in list_file_lines(path, "path speaker"):
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}:{number}: expected 'path speaker', got {line!r}")
        file = resolve_listed_path(path.parent, fields[0])
        if not file.is_file():
            raise FileNotFoundError(f"{path}:{number}: audio file not found: {file}")
        utterances.append(Utterance(file, fields[1]))
    if not utterances:
        raise ValueError(f"utterance list {path} is empty")
    return utterances


def load_noise_files(source: str | Path) -> list[Path]:
    """Noise files: every audio file below a folder, or a list file with one path per line."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"noise list or folder not found: {path}")
    if path.is_dir():
        files = find_audio_files(path)
    else:
        files = []
        for number, line in list_file_lines(path, "path"):
            file = resolve_listed_path(path.parent, line)
            if not file.is_file():
                raise FileNotFoundError(f"{path}:{number}: noise file not found: {file}")
            files.append(file)
    if not files:
        raise ValueError(f"no noise files in {path}")
    return files


def _rms(wave: np.ndarray) -> float:
    return float(np.sqrt(mean_square(wave) + EPS))


class DynamicMixingDataset(Dataset):
    """Mixtures made on the fly from single-speaker utterances.

    ``segment_samples`` set (training): each source is a random crop of that length, or a shorter utterance
    placed at a random offset in zeros. ``segment_samples=None`` (validation): the length of the shortest chosen
    utterance (wsj0-2mix "min" mode), capped at ``max_samples``.
    Returns ``{"id", "mix": [T], "sources": [S, T], "skipped"}``.
    """

    def __init__(self, utterances: list[Utterance], num_spks: int, store: AudioStore, num_examples: int,
                 segment_samples: int | None = None, max_samples: int | None = None, seed: int = 0,
                 fixed: bool = False, gain_db: tuple[float, float] = (-2.5, 2.5),
                 level_db: tuple[float, float] = (-30.0, -20.0),
                 speed_perturb: tuple[float, float] | None = None, noise_files: list[Path] | None = None,
                 noise_snr_db: tuple[float, float] = (10.0, 20.0), noise_prob: float = 1.0,
                 random_polarity: bool = False, skip_bad_files: bool = False) -> None:
        self.store = store
        self.skip_bad_files = skip_bad_files
        if store.cache:
            bad = store.preload([u.path for u in utterances] + list(noise_files or []), skip_bad_files)
            # Silent utterances, found now rather than when first drawn (hours into a run, without the cache).
            silent = [u.path for u in utterances if str(u.path) not in bad and is_silent(store.load(u.path))]
            if silent and not skip_bad_files:
                raise BadAudioError(f"{len(silent)} silent utterance(s), e.g. {silent[0]}: nothing to separate them "
                                    "from; remove them, or skip such files with data.skip_bad_files=true")
            if silent:
                log.warning("skipping %d silent utterance(s), e.g. %s", len(silent), silent[0])
            bad |= set(map(str, silent))
            utterances = [u for u in utterances if str(u.path) not in bad]
            noise_files = [f for f in noise_files or [] if str(f) not in bad] or None
            self.preload_skipped = len(bad)
        else:
            self.preload_skipped = 0
        by_speaker: dict[str, list[Path]] = {}
        for u in utterances:
            by_speaker.setdefault(u.speaker, []).append(u.path)
        if len(by_speaker) < num_spks:
            raise ValueError(f"dynamic mixing of {num_spks} speakers (model.num_spks) needs utterances of at least "
                             f"{num_spks} different speakers; the utterance list has {len(by_speaker)}")
        self.speakers = sorted(by_speaker)
        self.by_speaker = [by_speaker[s] for s in self.speakers]
        self.num_spks = num_spks
        self.num_examples = num_examples
        self.segment_samples = segment_samples
        self.max_samples = max_samples
        self.seed = seed
        self.fixed = fixed
        self.gain_db = gain_db
        self.level_db = level_db
        self.speed_perturb = speed_perturb
        self.noise_files = noise_files
        self.noise_snr_db = noise_snr_db
        self.noise_prob = noise_prob
        self.random_polarity = random_polarity
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_examples

    def _load(self, paths: list[Path], rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """A random readable file from ``paths`` and the number of bad ones skipped on the way."""
        skipped = 0
        for _ in range(20):
            path = paths[int(rng.integers(len(paths)))]
            try:
                wave = self.store.load(path)
                if is_silent(wave):  # (as MixtureDataset refuses such sources)
                    raise BadAudioError(f"{path} is silent (every sample is {wave[0]:g})")
                return wave, skipped
            except BadAudioError as err:
                if not self.skip_bad_files:
                    raise
                log.warning("skipping %s", err)
                skipped += 1
        raise BadAudioError(f"20 random picks among {len(paths)} files (e.g. {paths[0]}) were all unreadable")

    def _speed(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.speed_perturb is None:
            return wave
        factor = float(rng.uniform(*self.speed_perturb))
        # Playing ``factor`` times faster = resampling to sample_rate / factor and playing at sample_rate.
        return soxr.resample(wave, self.store.sample_rate, self.store.sample_rate / factor).astype(np.float32)

    def __getitem__(self, index: int) -> dict:
        if not -self.num_examples <= index < self.num_examples:  # IndexError ends a plain `for ex in dataset`
            raise IndexError(f"example {index} out of range: the dataset has {self.num_examples}")
        index %= self.num_examples  # negative indices count from the end, as in a list
        rng = example_rng(self.seed, 0 if self.fixed else self.epoch, index)
        speaker_ids = rng.choice(len(self.speakers), size=self.num_spks, replace=False)
        skipped = 0
        waves = []
        for spk in speaker_ids:
            wave, bad = self._load(self.by_speaker[spk], rng)
            skipped += bad
            waves.append(self._speed(wave, rng))
        if self.segment_samples is not None:
            length = self.segment_samples
        else:
            length = min(w.shape[-1] for w in waves)
            if self.max_samples is not None:
                length = min(length, self.max_samples)
        sources = np.zeros((self.num_spks, length), dtype=np.float32)
        for i, wave in enumerate(waves):
            if wave.shape[-1] >= length:  # (kept on its audio: no silent crop of a long leading/trailing silence)
                sources[i] = random_crop(wave, length, rng, active_span(wave[None]))
            else:  # a short utterance at a random place in the segment
                start = int(rng.integers(0, length - wave.shape[-1] + 1))
                sources[i, start:start + wave.shape[-1]] = wave
            gain_db = rng.uniform(*self.gain_db)
            sources[i] *= 10 ** (gain_db / 20) / _rms(sources[i])
        if self.random_polarity:  # drawn only when on, so that the other draws stay those of older runs
            sources *= np.where(rng.random(self.num_spks) < 0.5, -1.0, 1.0).astype(np.float32)[:, None]
        mix = sources.sum(0)
        if self.noise_files and rng.random() < self.noise_prob:
            noise, bad = self._load(self.noise_files, rng)
            skipped += bad
            if noise.shape[-1] < length:
                noise = np.tile(noise, -(-length // noise.shape[-1]))
            start = int(rng.integers(0, noise.shape[-1] - length + 1))
            noise = noise[start:start + length]
            snr_db = rng.uniform(*self.noise_snr_db)
            mix = mix + noise * (_rms(mix) / (_rms(noise) * 10 ** (snr_db / 20)))
        # A random overall level; never clip.
        scale = 10 ** (rng.uniform(*self.level_db) / 20) / _rms(mix)
        scale = min(scale, 0.99 / (float(np.abs(mix).max()) + EPS))
        epoch = 0 if self.fixed else self.epoch
        names = "+".join(self.speakers[s] for s in speaker_ids)
        return {"id": f"dm{epoch}_{index}_{names}", "mix": torch.from_numpy((mix * scale).astype(np.float32)),
                "sources": torch.from_numpy((sources * scale).astype(np.float32)), "skipped": skipped}

"""Datasets and DataLoaders from a training config, with resumable (and distributed) sampling."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mossformer2.data.collate import collate_fn
from mossformer2.data.config import DynamicMixingConfig
from mossformer2.data.datasets import AudioStore, BadAudioError, MixtureDataset
from mossformer2.data.dynamic_mixing import DynamicMixingDataset, load_noise_files, load_utterances
from mossformer2.distributed import DistInfo, get_dist_info
from mossformer2.utils import with_context

if TYPE_CHECKING:
    from mossformer2.training.config import TrainConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


class ResumableSampler(DistributedSampler):
    """DistributedSampler (also for one process) that can start an epoch part-way through.

    The order of epoch ``e`` is a function of ``(seed, e)``; ``set_epoch(e, start=k)`` skips this rank's first
    ``k`` indices, so a run resumed mid-epoch sees exactly the examples an uninterrupted run would.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class ShardSampler(Sampler):
    """Every ``num_replicas``-th index from ``rank``, in order, without padding (validation: no duplicates)."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def prepare_synthetic_data(cfg: TrainConfig, root: str | Path) -> TrainConfig:
    """Generate the synthetic corpus of ``data.synthetic`` under ``root`` (again only if its settings changed) and
    return the config with ``data.dynamic_mixing`` pointing at it: ``root/train`` and held-out speakers in
    ``root/valid``."""
    from mossformer2.data.synthetic import generate_speaker_corpus

    d = cfg.data
    root = Path(root)
    n_valid = max(cfg.model.num_spks, d.synthetic_speakers // 4)
    # The marker records the settings the corpus was made with: changed ones make a new corpus.
    # Held-out voices are interleaved with the training ones (every few steps of one spread of voices), never one.
    total = d.synthetic_speakers
    valid_voices = [round((k + 0.5) * total / n_valid) for k in range(n_valid)]
    train_voices = [k for k in range(total) if k not in valid_voices]
    settings = json.dumps({"train_voices": train_voices, "valid_voices": valid_voices,
                           "utterances": d.synthetic_utterances, "seconds": d.synthetic_seconds,
                           "sample_rate": d.sample_rate, "seed": cfg.trainer.seed}, sort_keys=True) + "\n"
    marker = root / "complete.txt"
    if not marker.is_file() or marker.read_text() != settings:
        log.info("generating a synthetic speaker corpus in %s%s", root,
                 " (the one there was made with other data.synthetic_* settings)" if marker.is_file() else "")
        marker.unlink(missing_ok=True)
        for part in ("train", "valid"):  # no speakers or files of an older or unfinished corpus may remain
            shutil.rmtree(root / part, ignore_errors=True)
        generate_speaker_corpus(root / "train", total, d.synthetic_utterances, d.synthetic_seconds,
                                d.sample_rate, seed=cfg.trainer.seed, voices=train_voices)
        generate_speaker_corpus(root / "valid", total, d.synthetic_utterances, d.synthetic_seconds,
                                d.sample_rate, seed=cfg.trainer.seed + 1, voices=valid_voices)
        marker.write_text(settings)
    dm = d.dynamic_mixing or DynamicMixingConfig(examples_per_epoch=256, valid_examples=32)
    dm = dataclasses.replace(dm, train_utterances=str(root / "train"), valid_utterances=str(root / "valid"))
    return dataclasses.replace(cfg, data=dataclasses.replace(d, synthetic=False, dynamic_mixing=dm))


def build_datasets(cfg: TrainConfig, progress: bool | None = True, is_main: bool = True
                   ) -> tuple[Dataset, Dataset]:
    """(training dataset, validation dataset) described by ``cfg.data`` (after :func:`prepare_synthetic_data`).

    ``progress``: show the ``cache_audio`` loading bar (create_dataloaders shows it on rank 0 only); ``is_main``:
    this process checks and warns about the data once for all (rank 0 under torchrun)."""
    from mossformer2.data.manifests import load_manifest, load_manifests

    d, seed, num_spks = cfg.data, cfg.trainer.seed, cfg.model.num_spks
    if d.synthetic:
        raise ValueError("data.synthetic is set: call prepare_synthetic_data(config, folder) first")
    store = AudioStore(d.sample_rate, cache=d.cache_audio, progress=progress)
    segment = int(round(d.segment_seconds * d.sample_rate))
    max_valid = None if d.max_valid_seconds is None else int(round(d.max_valid_seconds * d.sample_rate))
    dm = d.dynamic_mixing

    if dm is not None:
        noise = _named("data.dynamic_mixing.noise", load_noise_files, dm.noise) if dm.noise else None
        common = dict(num_spks=num_spks, store=store, seed=seed, gain_db=tuple(dm.gain_db),
                      level_db=tuple(dm.level_db), noise_files=noise, noise_snr_db=tuple(dm.noise_snr_db),
                      noise_prob=dm.noise_prob, skip_bad_files=d.skip_bad_files)
        utterances = _named("data.dynamic_mixing.train_utterances", load_utterances, dm.train_utterances)
        train = _mixing_dataset("data.dynamic_mixing.train_utterances", utterances,
                                num_examples=dm.examples_per_epoch, segment_samples=segment,
                                speed_perturb=_pair(dm.speed_perturb), random_polarity=dm.random_polarity, **common)
        if dm.valid_utterances and not d.valid:
            valid_max = int(round(dm.valid_max_seconds * d.sample_rate))
            if max_valid is not None:
                valid_max = min(valid_max, max_valid)
            valid_utterances = _named("data.dynamic_mixing.valid_utterances", load_utterances, dm.valid_utterances)
            if is_main:
                _warn_shared_speakers(utterances, valid_utterances)
            valid = _mixing_dataset("data.dynamic_mixing.valid_utterances", valid_utterances,
                                    num_examples=dm.valid_examples, max_samples=valid_max, fixed=True, **common)
            return train, valid
    else:
        entries = _named("data.train", load_manifests, d.train, num_spks)
        train = _named("data.train", lambda: MixtureDataset(entries, store, segment_samples=segment, seed=seed,
                                                            skip_bad_files=d.skip_bad_files))
        if is_main:
            _warn_resampled("data.train", train.file_rates, d.sample_rate)
    entries = _named("data.valid", load_manifest, d.valid, num_spks)
    valid = _named("data.valid", lambda: MixtureDataset(entries, store, max_samples=max_valid, seed=seed,
                                                        skip_bad_files=d.skip_bad_files))
    if is_main:
        _warn_resampled("data.valid", valid.file_rates, d.sample_rate)
    return train, valid


def _warn_resampled(key: str, rates: Counter, sample_rate: int) -> None:
    """Say when files of a pre-mixed set are at another rate than ``data.sample_rate``: they are resampled as
    they are read, so a wrong folder (wav8k for a 16 kHz model) trains on band-limited audio without a word."""
    other = {rate: count for rate, count in sorted(rates.items()) if rate != sample_rate}
    if other:
        listed = ", ".join(f"{count} at {rate} Hz" for rate, count in other.items())
        log.warning("%s: %d of %d files are not at data.sample_rate %d Hz (%s): they are resampled as they are "
                    "read (is this the set for %d Hz?)", key, sum(other.values()), sum(rates.values()),
                    sample_rate, listed, sample_rate)


def _warn_shared_speakers(train: list, valid: list) -> None:
    """Dynamic mixing validates on held-out speakers: warn when the two utterance lists share speaker names (which
    may be chance across corpora) or recordings (which is not)."""
    names = sorted({u.speaker for u in train} & {u.speaker for u in valid})
    files = {u.path.resolve() for u in train} & {u.path.resolve() for u in valid}
    if names or files:
        shown = f"speaker name(s) {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}" if names else ""
        log.warning("data.dynamic_mixing: train_utterances and valid_utterances share %s%s%s: validation is then "
                    "not on held-out speakers", shown, " and " if names and files else "",
                    f"{len(files)} recording(s)" if files else "")


def _named(key: str, load: Callable[..., T], *args: Any) -> T:
    """``load(*args)`` with its errors (missing or malformed list) naming the config key that gave the path."""
    try:
        return load(*args)
    except (FileNotFoundError, ValueError) as err:
        raise with_context(err, f"{key}: {err}") from None


def _mixing_dataset(key: str, utterances: list, **kwargs: Any) -> DynamicMixingDataset:
    """A DynamicMixingDataset whose errors about its utterances (too few speakers) name the config key; an unreadable
    file's error names the file itself (it may be a noise file)."""
    try:
        return DynamicMixingDataset(utterances, **kwargs)
    except BadAudioError:
        raise
    except ValueError as err:
        raise with_context(err, f"{key}: {err}") from None


def _pair(values: list[float] | None) -> tuple[float, float] | None:
    return None if values is None else (float(values[0]), float(values[1]))


def create_dataloaders(cfg: TrainConfig, dist_info: DistInfo | None = None,
                       datasets: tuple[Dataset, Dataset] | None = None) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders for this rank.

    Training: shuffled per epoch by :class:`ResumableSampler` (a DistributedSampler), full batches only.
    Validation: this rank's shard of the full utterances, in order. Neither touches the global torch RNG, so
    making a loader mid-run does not change the model's random stream (exact resume).
    """
    dist_info = dist_info or get_dist_info()
    train, valid = datasets or build_datasets(cfg, progress=cfg.trainer.progress_bar if dist_info.is_main else False,
                                              is_main=dist_info.is_main)
    d = cfg.data
    if len(train) < d.batch_size * dist_info.world_size:
        raise ValueError(f"the training set has {len(train)} examples, fewer than one batch "
                         f"({d.batch_size} x {dist_info.world_size} processes)")
    sampler = ResumableSampler(train, dist_info.world_size, dist_info.rank, shuffle=True, seed=cfg.trainer.seed)
    common = dict(collate_fn=collate_fn, num_workers=d.num_workers, pin_memory=torch.cuda.is_available(),
                  generator=torch.Generator(), persistent_workers=False)
    train_loader = DataLoader(train, batch_size=d.batch_size, sampler=sampler, drop_last=True, **common)
    valid_loader = DataLoader(valid, batch_size=d.valid_batch_size,
                              sampler=ShardSampler(valid, dist_info.world_size, dist_info.rank), **common)
    return train_loader, valid_loader


def set_loader_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Select epoch ``epoch``'s order and data, starting after ``start_batch`` batches (resume)."""
    if isinstance(loader.sampler, ResumableSampler):
        loader.sampler.set_epoch(epoch, start=start_batch * (loader.batch_size or 1))
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def batches_per_epoch(loader: DataLoader) -> int:
    """Full batches in one whole epoch of ``loader`` (ignoring any resume offset)."""
    sampler = loader.sampler
    n = sampler.num_samples if isinstance(sampler, ResumableSampler) else len(sampler)
    return n // loader.batch_size if loader.drop_last else math.ceil(n / loader.batch_size)

"""Typed configuration of the training data: pre-mixed sets or dynamic mixing (the ``data`` section of a
training config, :mod:`mossformer2.training.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DynamicMixingConfig:
    """On-the-fly mixtures of single-speaker utterances (``<root>/<speaker>/*.wav`` or ``path speaker`` lists)."""

    train_utterances: str | list[str] | None = None  # folder(s) or list file(s) of training speakers
    valid_utterances: str | list[str] | None = None  # held-out speakers: fixed validation mixtures
    examples_per_epoch: int = 20000
    valid_examples: int = 200
    gain_db: list[float] = field(default_factory=lambda: [-2.5, 2.5])  # per-source level around equal RMS
    level_db: list[float] = field(default_factory=lambda: [-30.0, -20.0])  # mixture RMS in dBFS
    speed_perturb: list[float] | None = None  # e.g. [0.95, 1.05]: random speed factor per source (soxr)
    # Negate each source with probability 0.5 (training mixtures only): s1 - s2 is as natural a mixture as
    # s1 + s2, and the network's ReLU encoder sees both half-waves of each speaker.
    random_polarity: bool = False
    noise: str | None = None  # folder or list of noise files; None: no noise
    noise_snr_db: list[float] = field(default_factory=lambda: [10.0, 20.0])  # speech-to-noise ratio
    noise_prob: float = 1.0  # chance that a mixture gets noise (when ``noise`` is set)
    valid_max_seconds: float = 6.0  # validation mixtures use the shortest utterance, capped here


@dataclass
class DataConfig:
    sample_rate: int = 16000
    segment_seconds: float = 4.0  # random training crops; same offset for mix and sources
    # pre-mixed training set(s): wsj0-2mix folder, LibriMix / WHAM! mixture folder, LibriMix CSV or scp list; a list
    # of them trains on all (e.g. Libri2Mix train-100 + train-360)
    train: str | list[str] | None = None
    valid: str | None = None  # pre-mixed validation set (full utterances)
    # Replaces ``train``; validation then uses either ``valid`` or the held-out ``valid_utterances``.
    dynamic_mixing: DynamicMixingConfig | None = None
    max_valid_seconds: float | None = None  # crop long validation utterances (memory); None: full length
    batch_size: int = 1
    valid_batch_size: int = 1
    num_workers: int = 2
    cache_audio: bool = False  # keep decoded audio in memory (small corpora)
    skip_bad_files: bool = False  # skip and count unreadable files instead of stopping with an error
    synthetic: bool = False  # generate a small synthetic speaker corpus in <exp-dir>/synthetic (smoke tests)
    synthetic_speakers: int = 12
    synthetic_utterances: int = 8  # per speaker
    synthetic_seconds: float = 2.0

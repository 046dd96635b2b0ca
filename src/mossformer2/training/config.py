"""Typed training configuration: ``model``, ``data``, ``optim`` and ``trainer`` sections loaded from YAML.

Unknown keys and wrongly typed values raise :class:`mossformer2.config_utils.ConfigError` naming the key.
``model`` may name a preset (``model: {name: MossFormer2-S, dropout: 0.0}``): the named configuration is the
base and the other keys override it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mossformer2.config_utils import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_yaml,
    model_config_from_section,
    save_yaml,
)
from mossformer2.data.config import DataConfig
from mossformer2.hub import is_hub_id, is_model_name
from mossformer2.models.config import MossFormer2Config


@dataclass
class OptimConfig:
    lr: float = 1.5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0  # actually applied (the official recipe parses 1e-5 but never uses it)
    decoupled_weight_decay: bool = False  # True: AdamW; False: Adam with L2 weight decay
    grad_clip: float | None = 5.0  # max grad norm, applied once per optimizer step (None: no clipping)
    accum_steps: int = 1  # micro-batches per optimizer step
    plateau_patience: int = 4  # halve the lr after more than this many epochs without improvement
    plateau_factor: float = 0.5
    min_lr: float = 0.0
    early_stop_patience: int | None = 10  # epochs without improvement before stopping (None: never)
    loss_clamp_db: float | None = None  # cap each speaker's SI-SDR in the loss (e.g. 30)


@dataclass
class TrainerConfig:
    max_epochs: int = 120
    max_steps: int | None = None  # stop after this many optimizer steps (None: epochs decide)
    max_minutes: float | None = None  # stop this run after so many minutes of training, resumable (a time-boxed GPU)
    seed: int = 777
    device: str = "auto"
    cpu_threads: int | None = None  # torch intra-op threads (None: torch's default); 1 is far faster on busy CPUs
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: bool = False
    # Exponential moving average of the weights (e.g. 0.999; None: off). Validation, best.pt and so the
    # selected model use the averaged weights; last.pt keeps both, so a run resumes exactly.
    ema_decay: float | None = None
    init_from: str | None = None  # fine-tune: official checkpoint or one of ours
    # Continue from <exp-dir>/last.pt when it exists. False: start a fresh run; the files of a run already in
    # <exp-dir> (last.pt, best.pt, train.log, config.yaml, tensorboard/) are moved to <exp-dir>/replaced-<time>/.
    resume: bool = True
    checkpoint_every_steps: int | None = 5000
    # Stop with an error after this many consecutive optimizer steps skipped for a NaN/inf loss or gradient (the
    # model diverged; last.pt keeps the state before them). None: never stop, keep skipping.
    max_nonfinite_steps: int | None = 100
    log_every_steps: int = 50
    audio_examples: int = 2  # validation examples written to TensorBoard
    tensorboard: bool = True
    progress_bar: bool | None = None  # None: only when stderr is a terminal (no carriage returns in logs)


@dataclass
class TrainConfig:
    model: MossFormer2Config = field(default_factory=MossFormer2Config)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self) -> None:
        """Raise ConfigError naming the first wrong setting (section by section: data, optim, trainer)."""
        _finite(self, "")
        _positive(self, "data.sample_rate", "data.segment_seconds", "data.batch_size", "data.valid_batch_size",
                  "optim.lr", "optim.eps", "optim.accum_steps", "trainer.max_epochs", "trainer.log_every_steps")
        self._validate_data()
        self._validate_optim()
        self._validate_trainer()

    def _validate_data(self) -> None:
        d, dm = self.data, self.data.dynamic_mixing
        if d.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")
        if d.sample_rate != self.model.sample_rate:
            raise ConfigError(f"data.sample_rate ({d.sample_rate}) must equal model.sample_rate "
                              f"({self.model.sample_rate})")
        min_samples = self.model.min_input_length  # the loaders round seconds to samples alike
        crops = {"data.segment_seconds": d.segment_seconds, "data.max_valid_seconds": d.max_valid_seconds,
                 "data.dynamic_mixing.valid_max_seconds": dm.valid_max_seconds if dm is not None else None}
        for name, seconds in crops.items():
            if seconds is not None and int(round(seconds * d.sample_rate)) < min_samples:
                raise ConfigError(f"{name} ({seconds:g} s = {int(round(seconds * d.sample_rate))} samples at "
                                  f"{d.sample_rate} Hz) is too short: the model needs at least {min_samples} samples "
                                  f"({min_samples / d.sample_rate:.4g} s; two encoder frames: encoder_kernel_size "
                                  f"{self.model.encoder_kernel_size} + hop {self.model.hop_size})")
        self._validate_data_sources()
        if dm is not None:
            _range(dm.gain_db, "data.dynamic_mixing.gain_db")
            _range(dm.noise_snr_db, "data.dynamic_mixing.noise_snr_db")
            _range(dm.level_db, "data.dynamic_mixing.level_db")
            if dm.speed_perturb is not None:
                _range(dm.speed_perturb, "data.dynamic_mixing.speed_perturb")
                if dm.speed_perturb[0] <= 0:
                    raise ConfigError("data.dynamic_mixing.speed_perturb factors must be > 0")
            if dm.examples_per_epoch <= 0 or dm.valid_examples <= 0:
                raise ConfigError("data.dynamic_mixing.examples_per_epoch and valid_examples must be > 0")
            if not 0.0 <= dm.noise_prob <= 1.0:
                raise ConfigError("data.dynamic_mixing.noise_prob must be in [0, 1]")

    def _validate_data_sources(self) -> None:
        """Exactly one source of training and validation data: synthetic, dynamic mixing or pre-mixed sets."""
        d, dm, num_spks = self.data, self.data.dynamic_mixing, self.model.num_spks
        if d.synthetic:
            _positive(self, "data.synthetic_utterances", "data.synthetic_seconds")
            if d.train or d.valid or (dm is not None and (dm.train_utterances or dm.valid_utterances)):
                raise ConfigError("data.synthetic generates its own data: leave data.train, data.valid and "
                                  "data.dynamic_mixing's utterance lists unset")
            if d.synthetic_speakers < max(num_spks + 2, 2 * num_spks):
                raise ConfigError(f"data.synthetic_speakers must be at least {max(num_spks + 2, 2 * num_spks)} for "
                                  f"{num_spks} speakers per mixture (they are split into training and held-out "
                                  "validation speakers, each enough to mix)")
        elif dm is not None:
            if not dm.train_utterances:
                raise ConfigError("data.dynamic_mixing.train_utterances is required with dynamic mixing (any "
                                  "data.dynamic_mixing key turns it on: it builds mixtures from single-speaker "
                                  "utterances; a pre-mixed set, data.train, has no augmentation)")
            if d.train:
                raise ConfigError("set either data.train (pre-mixed) or data.dynamic_mixing, not both")
            if d.valid and dm.valid_utterances:  # one of them would be ignored
                raise ConfigError("set either data.valid (pre-mixed) or data.dynamic_mixing.valid_utterances "
                                  "(held-out speakers), not both")
            if not (d.valid or dm.valid_utterances):
                raise ConfigError("validation data is required: set data.valid (pre-mixed) or "
                                  "data.dynamic_mixing.valid_utterances (held-out speakers)")
        elif not d.train or not d.valid:
            raise ConfigError("set data.train and data.valid (wsj0-2mix folder, LibriMix CSV or scp list), "
                              "or data.dynamic_mixing, or data.synthetic: true")

    def _validate_optim(self) -> None:
        o = self.optim
        if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        if not o.weight_decay >= 0 or (o.grad_clip is not None and not o.grad_clip > 0):
            raise ConfigError("optim.weight_decay must be >= 0 and optim.grad_clip > 0 (or null)")
        if not 0.0 < o.plateau_factor < 1.0:
            raise ConfigError("optim.plateau_factor must be in (0, 1)")
        if o.plateau_patience < 0:
            raise ConfigError(f"optim.plateau_patience must be >= 0, got {o.plateau_patience}")
        if o.min_lr < 0:
            raise ConfigError(f"optim.min_lr must be >= 0, got {o.min_lr}")
        if o.early_stop_patience is not None and o.early_stop_patience < 1:
            raise ConfigError(f"optim.early_stop_patience must be >= 1 or null (never stop early), got "
                              f"{o.early_stop_patience}")

    def _validate_trainer(self) -> None:
        t = self.trainer
        if not 0 <= t.seed < 2**63:  # NumPy's generators take no negative seed (it failed once the run had started)
            raise ConfigError(f"trainer.seed must be from 0 to 2**63 - 1, got {t.seed}")
        if t.audio_examples < 0:
            raise ConfigError(f"trainer.audio_examples must be >= 0, got {t.audio_examples}")
        if t.cpu_threads is not None and t.cpu_threads <= 0:
            raise ConfigError("trainer.cpu_threads must be > 0 or null")
        if t.max_steps is not None and t.max_steps <= 0:
            raise ConfigError("trainer.max_steps must be > 0 or null")
        if t.max_minutes is not None and not t.max_minutes > 0:
            raise ConfigError("trainer.max_minutes must be > 0 or null")
        if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
            raise ConfigError(f"trainer.ema_decay must be in (0, 1) or null, got {t.ema_decay}")
        if t.checkpoint_every_steps is not None and t.checkpoint_every_steps <= 0:
            raise ConfigError("trainer.checkpoint_every_steps must be > 0 or null")
        if t.max_nonfinite_steps is not None and t.max_nonfinite_steps <= 0:
            raise ConfigError("trainer.max_nonfinite_steps must be > 0 or null (never stop)")


def _positive(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if not value > 0:  # also rejects NaN
            raise ConfigError(f"{name} must be > 0, got {value!r}")


def _finite(section: Any, where: str) -> None:
    """Every number of the config is finite: an infinite lr or duration would only fail later (NaN weights,
    OverflowError on conversion to samples)."""
    for f in dataclasses.fields(section):
        value, name = getattr(section, f.name), f"{where}{f.name}"
        numbers = value if isinstance(value, list) else [value]
        if dataclasses.is_dataclass(value):
            _finite(value, f"{name}.")
        elif any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")


def _range(values: list[float], name: str) -> None:
    if len(values) != 2 or values[0] > values[1]:
        raise ConfigError(f"{name} must be [low, high] with low <= high, got {values}")


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"training config: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    model = model_config_from_section(data.pop("model", None))
    cfg = from_dict(TrainConfig, data, "config")
    cfg = dataclasses.replace(cfg, model=model)
    cfg.validate()
    return cfg


def _check_override_key(item: str) -> None:
    """Reject an override ``key.sub=value`` whose key is not in the config schema, naming the override (not the
    YAML file, which may be fine)."""
    key = item.split("=", 1)[0].strip()
    cls: Any = TrainConfig
    done: list[str] = []
    for part in key.split("."):
        if cls is None:  # the previous part is a value, not a section
            raise ConfigError(f"command-line override {item!r}: {'.'.join(done)} is a value, not a section")
        allowed = {f.name: f.name for f in dataclasses.fields(cls) if f.init}
        if cls is MossFormer2Config:
            allowed["name"] = "name"  # the preset name
        if part not in allowed:
            where = ".".join(done) or "the config"
            raise ConfigError(f"command-line override {item!r}: unknown key {part!r} in {where}; allowed keys are "
                              f"{sorted(allowed)}")
        done.append(part)
        tp = str if (cls is MossFormer2Config and part == "name") else typing.get_type_hints(cls)[part]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[section]
            tp = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)
        cls = tp if dataclasses.is_dataclass(tp) else None


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML training config (or the defaults when ``path`` is None) and apply ``key.sub=value`` overrides."""
    data = load_yaml(path) if path is not None else {}
    for item in overrides or []:
        if "=" in item:  # apply_overrides rejects the others
            _check_override_key(item)
    overrides = list(overrides or [])
    merged = apply_overrides(data, overrides)  # its errors already name the override
    try:
        return train_config_from_dict(merged)
    except ConfigError as err:
        raise ConfigError(_blame(err, path, data, overrides)) from None


def _blame(err: ConfigError, path: str | Path | None, data: dict[str, Any], overrides: list[str]) -> str:
    """``err``'s message prefixed with its cause: the YAML file when the file alone gives the same error, else the
    command-line overrides without which it goes away (all overrides if no single one does)."""
    if not overrides:
        return f"{path}: {err}" if path is not None else str(err)

    def same_error(items: list[str]) -> bool:
        try:
            train_config_from_dict(apply_overrides(data, items))
        except ConfigError as other:
            return str(other) == str(err)
        return False

    if path is not None and same_error([]):
        return f"{path}: {err}"
    named = [item for item in overrides if not same_error([o for o in overrides if o is not item])]
    culprits = ", ".join(repr(item) for item in named or overrides)
    what = "command-line override" + ("s" if len(named or overrides) > 1 else "")
    if not named and path is not None:
        return f"{path} with {what} {culprits}: {err}"
    return f"{what} {culprits}: {err}"


def absolute_path(path: str) -> str:
    """``path`` with ``~`` expanded, made absolute against the current folder (the launch folder)."""
    return os.path.abspath(os.path.expanduser(path))


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its data and checkpoint paths made absolute against the current folder (the launch folder),
    so that the config saved in the experiment folder still names the same files when used from elsewhere."""
    def absolute(value: Any) -> Any:
        if isinstance(value, list):
            return [absolute(v) for v in value]
        return absolute_path(value) if isinstance(value, str) and value else value

    d, dm = cfg.data, cfg.data.dynamic_mixing
    if dm is not None:
        dm = dataclasses.replace(dm, train_utterances=absolute(dm.train_utterances),
                                 valid_utterances=absolute(dm.valid_utterances), noise=absolute(dm.noise))
    data = dataclasses.replace(d, train=absolute(d.train), valid=absolute(d.valid), dynamic_mixing=dm)
    init_from = cfg.trainer.init_from  # a model name or hub id (init_from=default) names no local path
    named = is_model_name(init_from) or is_hub_id(init_from)
    trainer = dataclasses.replace(cfg.trainer, init_from=init_from if named else absolute(init_from))
    return dataclasses.replace(cfg, data=data, trainer=trainer)


def save_train_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML, atomically."""
    save_yaml(cfg, path)

"""The training loop: PIT SI-SDR loss, Adam, accumulation, plateau halving, early stopping, an optional moving
average of the weights, exact resume, DDP.

Counters: ``step`` counts optimizer steps (including skipped ones), ``epoch`` is the epoch in progress and
``batches_done`` the micro-batches of it already consumed. A checkpoint taken after any optimizer step holds
these, the RNG states, the optimizer/scheduler/scaler states and the weight average, so a resumed run continues
exactly where the interrupted one stopped and ends with bit-identical weights (on CPU; cuDNN/NCCL may add
nondeterminism on GPU). SIGINT (Ctrl-C) or SIGTERM (preemption) during :meth:`Trainer.fit` stops the run after the
current optimizer step with such a checkpoint saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import logging.handlers
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

from mossformer2.checkpoint import read_checkpoint, save_checkpoint
from mossformer2.config_utils import to_dict
from mossformer2.data.loaders import batches_per_epoch, create_dataloaders, prepare_synthetic_data, set_loader_epoch
from mossformer2.hub import TRAINER_BEST, TRAINER_LAST
from mossformer2.losses import pit_si_sdr_loss, reorder_estimates, si_sdr
from mossformer2.models import MossFormer2, MossFormer2Config, build_model
from mossformer2.training.config import TrainConfig, absolute_path, save_train_config, with_absolute_paths
from mossformer2.training.distributed import DistInfo, all_reduce_sum, barrier, get_dist_info
from mossformer2.training.experiment import (
    ExperimentLock,
    TrainingInterrupted,
    move_run_files_aside,
    stop_signals,
)
from mossformer2.utils import bar_disabled, resolve_device, with_context

log = logging.getLogger("mossformer2.training")

LAST, BEST = TRAINER_LAST, TRAINER_BEST  # one definition: hub.py takes best.pt from a trainer's folder
# Under DDP, validation looks for a stop signal every this many batches (an all-reduce, which syncs the device).
VALID_STOP_CHECK_EVERY = 10


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress
    step: int = 0  # optimizer steps taken (skipped ones included)
    batches_done: int = 0  # micro-batches of the current epoch already consumed
    best_metric: float = -math.inf  # best validation SI-SDRi (dB)
    best_epoch: int = -1
    bad_epochs: int = 0  # consecutive validations without improvement
    skipped_steps: int = 0  # optimizer steps skipped for a NaN/inf loss or gradient
    # Reads of unreadable files skipped by this rank's data pipeline (a bad file read in every epoch counts once
    # per epoch; checkpoints: all ranks' total).
    skipped_files: int = 0
    epoch_loss_sum: float = 0.0  # training loss of the current epoch so far (survives a resume)
    epoch_loss_count: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch validation results
    # The units of ``batches_done``: processes x examples per batch of the run that saved it (0: unknown, older
    # checkpoints). A resume with another layout converts ``batches_done`` through the examples consumed.
    world_size: int = 0
    batch_size: int = 0


# Counted by each rank for its own data under DDP: a checkpoint holds their totals, which rank 0 resumes with.
_RANK_SUMS = ("skipped_files", "epoch_loss_sum", "epoch_loss_count")


def _rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU, CUDA) RNG states in a ``weights_only``-loadable form."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingDivergedError(ValueError):
    """``trainer.max_nonfinite_steps`` consecutive optimizer steps had a NaN/inf loss or gradient."""


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Trains a MossFormer2 per a :class:`TrainConfig`, writing checkpoints and logs to ``exp_dir``.

    ``loaders`` (train, valid) may be given (tests); by default they come from :func:`create_dataloaders`.
    Only rank 0 writes files. Call :meth:`fit`.
    """

    def __init__(self, cfg: TrainConfig, exp_dir: str | Path, loaders: tuple[DataLoader, DataLoader] | None = None,
                 dist_info: DistInfo | None = None) -> None:
        self.cfg = with_absolute_paths(cfg)  # config.yaml and the checkpoints then name the files from anywhere
        self.exp_dir = Path(exp_dir)
        self.dist = dist_info or get_dist_info()
        t = self.cfg.trainer
        self.device = resolve_device(t.device)
        if self.dist.is_distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if t.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("trainer.precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        self.resuming = t.resume and (self.exp_dir / LAST).is_file()
        # Read and checked against the model config before the data is read (minutes with data.cache_audio) and
        # before the experiment folder is made; applied once the model is built.
        self._pretrained = self._load_pretrained(t.init_from) if t.init_from and not self.resuming else None
        if t.cpu_threads:
            torch.set_num_threads(t.cpu_threads)
        if self.device.type == "cpu":
            # Subnormal floats appear in activations/gradients as training goes on and make x86 CPUs 10x+
            # slower; flushing them to zero changes nothing measurable in the results. (Intra-op worker
            # threads copy this mode only when created: `mossformer2 train` sets it before any torch op.)
            torch.set_flush_denormal(True)
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]
        self.writer = None
        self._log_handler: logging.Handler | None = None
        self._audio_logged: set[str] = set()  # validation examples whose mixture and references TensorBoard has
        self._lock: ExperimentLock | None = None
        self._setup_log: logging.handlers.MemoryHandler | None = None
        self.stop_reason: str | None = None  # why fit() stopped before the end (a limit or a signal); None: it ended
        self._stop_signal: int | None = None
        self._nonfinite_streak = 0  # consecutive optimizer steps skipped for a NaN/inf loss or gradient
        self._saved_step: int | None = None  # the step last.pt holds
        self._fit_started, self._stop_checked_at, self._signal = time.monotonic(), None, None
        if self.dist.is_main:
            if log.level == logging.NOTSET or log.level > logging.INFO:
                log.setLevel(logging.INFO)
            self._lock = ExperimentLock(self.exp_dir)  # at once: a second run in this folder fails before any work
            # Setup messages (resume warnings, ...) are kept for train.log, which is only made once setup succeeded.
            self._setup_log = logging.handlers.MemoryHandler(capacity=10**6, flushLevel=logging.CRITICAL + 1)
            log.addHandler(self._setup_log)
        else:  # under torchrun, one copy of the progress messages (rank 0's); every rank still warns
            log.setLevel(logging.WARNING)
        try:
            self._setup(loaders)
        except BaseException:
            self._abandon_setup()
            raise

    def _setup(self, loaders: tuple[DataLoader, DataLoader] | None) -> None:
        t, o = self.cfg.trainer, self.cfg.optim
        if loaders is None and self.cfg.data.synthetic:
            self.cfg = self._prepare_synthetic_corpus()
        # Data first: a missing or malformed corpus fails before any file of the run is written.
        self.train_loader, self.valid_loader = loaders or create_dataloaders(self.cfg, self.dist)
        batches, accum = self._batches_per_epoch(), o.accum_steps
        if batches < accum:  # not one whole optimizer step per epoch
            raise ValueError(f"one epoch has {batches} batch(es){' per process' if self.dist.is_distributed else ''}"
                             f", fewer than optim.accum_steps ({accum}): lower optim.accum_steps or "
                             "data.batch_size, or use more training data")
        _seed_everything(t.seed)  # identical initial weights on every rank
        self.model: MossFormer2 = build_model(self.cfg.model)
        if t.activation_checkpointing:
            self.model.mask_net.mdl.intra_mdl.mossformerM.activation_checkpointing = True
        self.model.to(self.device)
        # The averaged copy is made before DDP wraps the model; every rank averages the same weights.
        self.ema: AveragedModel | None = None
        if t.ema_decay is not None:
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay))
        self.train_model: torch.nn.Module = self.model
        if self.dist.is_distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

        opt_cls = torch.optim.AdamW if o.decoupled_weight_decay else torch.optim.Adam
        self.optimizer = opt_cls(self.model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                 weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=o.plateau_factor, patience=o.plateau_patience, threshold=0.0,
            threshold_mode="abs", min_lr=o.min_lr)
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
        self.state = TrainState(world_size=self.dist.world_size, batch_size=self.cfg.data.batch_size)
        # Unreadable files dropped while ``data.cache_audio`` loaded (each run loads the cache again, so this is
        # not part of the resumable state); reported with the files skipped while batches are made.
        self.preload_skipped = sum(int(getattr(getattr(loader, "dataset", None), "preload_skipped", 0))
                                   for loader in (self.train_loader, self.valid_loader))
        last = self.exp_dir / LAST
        if self.resuming:
            self.load_checkpoint(last)
            self._saved_step = self.state.step
            log.info("resumed from %s: epoch %d, step %d, %d batches into the epoch", last, self.state.epoch,
                     self.state.step, self.state.batches_done)
        else:
            if self._pretrained is not None:
                self._init_from(self._pretrained, t.init_from)
                self._pretrained = None
            _seed_everything(t.seed + self.dist.rank)  # different dropout masks per rank
        if self.dist.is_main:
            self._open_run_files()
            n_params = sum(p.numel() for p in self.model.parameters())
            log.info("model: %.2f M parameters on %s, precision %s", n_params / 1e6, self.device, t.precision)

    # ------------------------------------------------------------------ setup helpers
    def _prepare_synthetic_corpus(self) -> TrainConfig:
        """``data.synthetic``: (re)make the corpus in ``<exp-dir>/synthetic`` only now that this run holds the
        folder's lock (a second run with other settings would otherwise rewrite it under the running one). Rank 0
        makes it; the other ranks then find it complete."""
        root = Path(absolute_path(str(self.exp_dir / "synthetic")))  # config.yaml names it from anywhere
        if self.dist.is_main:
            cfg = prepare_synthetic_data(self.cfg, root)
        barrier()
        if not self.dist.is_main:
            cfg = prepare_synthetic_data(self.cfg, root)
        return cfg

    def _open_run_files(self) -> None:
        """Once setup succeeded (rank 0): set a previous run aside if this one starts afresh, open train.log (with
        the setup's messages) and TensorBoard, save config.yaml."""
        if not self.resuming:
            self._move_previous_run_aside()
        self._log_handler = logging.FileHandler(self.exp_dir / "train.log")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(self._log_handler)
        if self._setup_log is not None:
            self._setup_log.setTarget(self._log_handler)
            self._setup_log.flush()
            log.removeHandler(self._setup_log)
            self._setup_log = None
        if self.cfg.trainer.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard drops the points an interrupted run logged after the step this run starts from (they are
            # logged again), instead of drawing them twice; step 1 for a rerun of one killed before its first
            # checkpoint.
            self.writer = SummaryWriter(str(self.exp_dir / "tensorboard"), purge_step=self.state.step + 1)
        save_train_config(self.cfg, self.exp_dir / "config.yaml")

    def _move_previous_run_aside(self) -> None:
        """A fresh run in a folder that holds another run's checkpoints (``trainer.resume=false``): move that run's
        files to ``replaced-<UTC time>/`` rather than overwrite them or mix both runs' logs."""
        if not any((self.exp_dir / name).exists() for name in (LAST, BEST)):
            return
        folder = move_run_files_aside(self.exp_dir, (LAST, BEST, "train.log", "config.yaml", "tensorboard"))
        why = "trainer.resume=false" if not self.cfg.trainer.resume else f"no {LAST} to resume from"
        log.warning("%s holds a previous run and this one starts afresh (%s): the previous run's files were moved "
                    "to %s", self.exp_dir, why, folder)

    def _abandon_setup(self) -> None:
        """After a failed start: close what was opened; remove the experiment folder if this start created it."""
        if self._setup_log is not None:
            log.removeHandler(self._setup_log)
            self._setup_log = None
        self.close(remove_created_folder=True)

    def _load_pretrained(self, path: str) -> MossFormer2:
        """``trainer.init_from``'s network (official checkpoint or ours: a file, or a folder holding one, as
        ``separate --checkpoint`` takes), refused unless it is of the configured architecture."""
        from mossformer2.checkpoint import load_model
        from mossformer2.hub import resolve_checkpoint

        ckpt: dict[str, Any] = {}
        try:
            if not Path(path).exists():
                raise FileNotFoundError("checkpoint not found")
            ckpt = read_checkpoint(resolve_checkpoint(path))
            return load_model(ckpt, config=self.cfg.model)
        except (ValueError, FileNotFoundError) as err:
            # Our checkpoints embed their model config: the keys that differ say more than 40 missing weight names.
            embedded = ckpt.get("config")
            diff = _config_diff(embedded, self.cfg.model.to_dict()) if isinstance(embedded, dict) else ""
            why = f"the checkpoint's model config differs from the config's ({diff})" if diff else str(err)
            raise with_context(err, f"trainer.init_from {path}: {why}") from None

    def _init_from(self, pretrained: MossFormer2, path: str) -> None:
        """Start from ``pretrained``'s weights (read from ``path``) and its recommended separation settings."""
        self.model.load_state_dict(pretrained.state_dict())
        if self.ema is not None:  # the average starts from these weights
            self.ema.module.load_state_dict(pretrained.state_dict())
        log.info("initialised the weights from %s", path)
        self._set_separation_settings(pretrained.separation_settings)
        if pretrained.separation_settings:
            log.info("its recommended separation settings (%s) go into this run's checkpoints",
                     ", ".join(f"{k}={v}" for k, v in pretrained.separation_settings.items()))

    def _set_separation_settings(self, settings: dict[str, bool]) -> None:
        """Inference-time refinements the init_from model recommends ('separation'): kept on the trained weights
        (and their average), where ``save_checkpoint`` writes them, so that a fine-tuned model keeps them."""
        for model in (self.model, self.eval_model):
            model.separation_settings = dict(settings)

    @property
    def eval_model(self) -> MossFormer2:
        """The weights that are validated and saved as best: the moving average when ``trainer.ema_decay`` is set."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path) -> None:
        """Write everything needed to resume (rank 0 writes; every rank must call it under DDP: RNG gather)."""
        rng_states = [_rng_state()]
        sums = {key: getattr(self.state, key) for key in _RANK_SUMS}
        if self.dist.is_distributed:
            gathered: list[Any] = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, (rng_states[0], sums))
            rng_states = [g[0] for g in gathered]
            sums = {key: sum(g[1][key] for g in gathered) for key in _RANK_SUMS}
        if not self.dist.is_main:
            return
        extra = {
            "scheduler": self.scheduler.state_dict(),
            "rng_states": rng_states,  # one per rank
            "trainer_state": to_dict(dataclasses.replace(self.state, **sums)),
            "train_config": to_dict(self.cfg),
        }
        if self.scaler is not None:
            extra["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            extra["ema"] = self.ema.state_dict()
        save_checkpoint(path, self.model, self.optimizer, epoch=self.state.epoch, step=self.state.step,
                        extra=extra)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimizer, scheduler, scaler, RNG states and the position in the data."""
        ckpt = read_checkpoint(path)
        missing = [k for k in ("model", "optimizer", "scheduler", "trainer_state", "rng_states") if k not in ckpt]
        if missing:
            raise ValueError(f"{path} is not a resumable training checkpoint (missing {missing}); use "
                             "trainer.init_from to start from its weights")
        saved_model = _with_defaults(ckpt.get("config"))
        if saved_model != self.cfg.model.to_dict():
            diff = _config_diff(saved_model, self.cfg.model.to_dict())
            raise ValueError(f"{path} was trained with another model config ({diff}); use another --exp-dir for "
                             "this model (or trainer.resume=false to start afresh here: the current run's files are "
                             "then moved to a replaced-<time>/ subfolder)")
        self.model.load_state_dict(ckpt["model"])
        self._set_separation_settings(ckpt.get("separation") or {})
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self._apply_changed_settings(ckpt.get("train_config") or {}, path)
        if self.scaler is not None and "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if "ema" in ckpt:
                self.ema.load_state_dict(ckpt["ema"])
            else:
                log.warning("%s holds no weight average: trainer.ema_decay starts one from its weights", path)
                self.ema.module.load_state_dict(ckpt["model"])
        self.state = _train_state(ckpt["trainer_state"], path)
        if self.dist.rank > 0:  # rank 0 goes on from the totals over all ranks
            self.state = dataclasses.replace(self.state, **dict.fromkeys(_RANK_SUMS, 0))
        saved_accum = ((ckpt.get("train_config") or {}).get("optim") or {}).get("accum_steps")
        self._continue_epoch_in_this_layout(path, saved_accum)
        if self.dist.is_main:  # one warning for all ranks
            self._warn_changed_data(ckpt.get("train_config") or {}, path)
        rng_states = ckpt["rng_states"]
        _set_rng_state(rng_states[self.dist.rank if self.dist.rank < len(rng_states) else 0])

    def _continue_epoch_in_this_layout(self, path: str | Path, saved_accum: int | None = None) -> None:
        """Express a mid-epoch ``batches_done`` saved by a run with another number of processes or batch size (or
        optim.accum_steps) in this run's batches: the examples of the epoch already used are skipped as closely as
        whole steps allow. Every rank takes every world_size-th example of one shuffled epoch order, so the
        examples used are the first ``batches_done x world_size x batch_size`` of it whatever the layout."""
        s, accum = self.state, self.cfg.optim.accum_steps
        new = (self.dist.world_size, self.cfg.data.batch_size)
        old = (s.world_size, s.batch_size) if s.world_size and s.batch_size else new  # older checkpoints: unknown
        s.world_size, s.batch_size = new
        before, after = old[0] * old[1] * (saved_accum or accum), new[0] * new[1] * accum
        if before != after and self.dist.is_main:
            log.warning("resuming from %s with another effective batch: %d process(es) x batch %d x "
                        "optim.accum_steps %d -> %d x %d x %d, %d -> %d examples per optimizer step, at the same "
                        "learning rate", path, *old, saved_accum or accum, *new, accum, before, after)
        if s.batches_done == 0 or (old == new and s.batches_done % accum == 0):  # nothing to convert
            return
        used, per_batch = s.batches_done * old[0] * old[1], new[0] * new[1]
        done = used // per_batch // accum * accum  # whole optimizer steps of this run
        log.warning("resuming mid-epoch %d from %s with another data layout (%d process(es) x batch %d -> %d x %d, "
                    "optim.accum_steps %d): continuing after %d of the %d examples the epoch had used; the rest of "
                    "this epoch is not exact (the per-rank data order changes)", s.epoch, path, *old, *new, accum,
                    done * per_batch, used)
        s.batches_done = done

    def _apply_changed_settings(self, saved: dict[str, Any], path: str | Path) -> None:
        """After loading ``path``'s optimizer/scheduler states (which hold the settings of the run that wrote it),
        apply this config's, so that config.yaml tells what runs. The lr is only set when ``optim.lr`` changed:
        otherwise the checkpoint's (maybe plateau-reduced) lr goes on. ``trainer.init_from`` only initialises a
        new run: on resume it is ignored, and config.yaml keeps the value the run started from."""
        o, old = self.cfg.optim, saved.get("optim", {})
        changed = _changed_settings(old, to_dict(o), "optim")
        if changed:
            log.warning("resuming %s with changed settings: %s%s", path, "; ".join(changed),
                        f" (the lr was {self.lr:.3g})" if old.get("lr", o.lr) != o.lr else "")
        for group in self.optimizer.param_groups:
            group.update(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                         decoupled_weight_decay=o.decoupled_weight_decay)
            if old.get("lr", o.lr) != o.lr:
                group["lr"] = o.lr
        self.scheduler.factor, self.scheduler.patience = o.plateau_factor, o.plateau_patience
        self.scheduler.default_min_lr = o.min_lr
        self.scheduler.min_lrs = [o.min_lr] * len(self.optimizer.param_groups)
        # (grad_clip, accum_steps, loss_clamp_db and early_stop_patience are read from the config when used.)
        started_from = saved.get("trainer", {}).get("init_from")
        if started_from and os.path.isabs(os.path.expanduser(started_from)):  # normalised as this config's is
            started_from = absolute_path(started_from)
        # (older checkpoints hold it as given: a relative one is kept so, its launch folder is unknown)
        if self.cfg.trainer.init_from != started_from:
            if self.cfg.trainer.init_from:
                log.warning("trainer.init_from %s is ignored: resuming from %s (to start from it, use another "
                            "--exp-dir, or trainer.resume=false: the current run's files are then moved to a "
                            "replaced-<time>/ subfolder)", self.cfg.trainer.init_from, path)
            self.cfg = dataclasses.replace(self.cfg, trainer=dataclasses.replace(self.cfg.trainer,
                                                                                 init_from=started_from))

    def _warn_changed_data(self, saved: dict[str, Any], path: str | Path) -> None:
        """Changed ``data.*`` settings (and ``trainer.seed``, which draws the mixtures) apply on resume (after the
        state is loaded): say which, and what no longer holds with them: the position in the epoch (other
        training data) and the best score so far (another validation set). ``saved``: the checkpoint's config."""
        changed = _changed_settings(saved.get("data") or {}, to_dict(self.cfg.data), "data")
        changed += _changed_settings(saved.get("trainer") or {}, {"seed": self.cfg.trainer.seed}, "trainer")
        if not changed:
            return
        log.warning("resuming %s with changed data settings: %s", path, "; ".join(changed))
        keys = {entry.split(" ", 1)[0] for entry in changed}
        s, per_epoch = self.state, self._epoch_batches()
        if s.batches_done >= per_epoch > 0 and self.train_loader is not None:
            log.warning("epoch %d had used %d batches, and has %d with these settings: it ends without further "
                        "steps", s.epoch, s.batches_done, per_epoch)
        elif s.batches_done and keys - DATA_KEYS_KEEPING_TRAINING_EXAMPLES:
            log.warning("epoch %d goes on after its first %d batches, which with these settings are other "
                        "examples than those trained on", s.epoch, s.batches_done)
        keeping = set(DATA_KEYS_KEEPING_VALIDATION)
        if self.cfg.data.valid:  # a pre-mixed validation set: the mixing settings shape the training data only
            keeping |= {key for key in keys if key.startswith("data.dynamic_mixing.")}
        if keys - keeping and s.best_epoch >= 0:
            log.warning("the validation data may have changed: the best score so far (%.2f dB, epoch %d, in %s) "
                        "was measured on the earlier set, and later epochs are compared with it", s.best_metric,
                        s.best_epoch, BEST)

    def _write_best(self) -> None:
        if self.dist.is_main:
            save_checkpoint(self.exp_dir / BEST, self.eval_model, epoch=self.state.epoch, step=self.state.step,
                            extra={"valid": self.state.history[-1], "train_config": to_dict(self.cfg)})

    # ------------------------------------------------------------------ training
    def _loss(self, est: torch.Tensor, batch: dict) -> torch.Tensor:
        loss, _ = pit_si_sdr_loss(est.float(), batch["sources"], batch["lengths"],
                                  clamp_db=self.cfg.optim.loss_clamp_db)
        return loss

    def _all_finite(self, value: torch.Tensor) -> bool:
        """True when ``value`` is finite on every rank (all ranks then take the same branch)."""
        bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=self.device)
        return float(all_reduce_sum(bad).item()) == 0.0

    def _optimizer_step(self, bad: bool) -> float:
        """Clip the accumulated gradient once, then step unless the loss or gradient was NaN/inf; returns the
        gradient norm (NaN for a skipped step: a skipped loss left no gradient to measure)."""
        o = self.cfg.optim
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = o.grad_clip if o.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        skipped = bad or not self._all_finite(grad_norm)
        if skipped:
            self.state.skipped_steps += 1
            self._nonfinite_streak += 1
            log.warning("step %d skipped: non-finite %s (%d skipped so far)", self.state.step + 1,
                        "loss" if bad else "gradient", self.state.skipped_steps)
            if self.scaler is not None:
                self.scaler.update()
            self._check_diverged()
        else:
            self._nonfinite_streak = 0
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return math.nan if skipped else float(grad_norm)

    def _check_diverged(self) -> None:
        """Stop after ``trainer.max_nonfinite_steps`` skipped steps in a row (identical on every rank)."""
        limit, n = self.cfg.trainer.max_nonfinite_steps, self._nonfinite_streak
        if limit is None or n < limit:
            return
        if self._saved_step is not None:
            kept = f"{self.exp_dir / LAST} keeps step {self._saved_step}, before them"
            how = ("run again to resume from there (if it diverges again at once, start afresh with "
                   "trainer.resume=false)")
        else:
            kept, how = f"no {LAST} was written", "run again (it starts afresh)"
        message = (f"the model diverged: {n} optimizer steps in a row (steps {self.state.step + 2 - n}-"
                   f"{self.state.step + 1}) had a NaN/inf loss or gradient (trainer.max_nonfinite_steps); {kept}. "
                   f"Lower optim.lr (or set optim.grad_clip) and {how}")
        log.error("%s", message)
        raise TrainingDivergedError(message)

    def _should_stop(self) -> bool:
        """A step or time limit reached, or SIGINT/SIGTERM received (sets ``stop_reason``). Decided once per
        optimizer step and again after each validation, by all ranks together in one all-reduce: signals and clocks
        reach the ranks at slightly different times, and all must stop at the same step."""
        if self.stop_reason is not None:
            return True
        t, key = self.cfg.trainer, (self.state.epoch, self.state.step)
        if self._stop_checked_at == key:
            return False
        self._stop_checked_at = key
        late, sigint, sigterm = self._stop_flags()
        if self._note_signal(sigint, sigterm):
            return True
        if t.max_steps is not None and self.state.step >= t.max_steps:
            self.stop_reason = f"trainer.max_steps ({t.max_steps}) reached"
        elif late:
            self.stop_reason = f"trainer.max_minutes ({t.max_minutes:g}) reached"
        return self.stop_reason is not None

    def _stop_flags(self) -> tuple[bool, bool, bool]:
        """(time limit passed, SIGINT, SIGTERM) on any rank: one all-reduce, which every rank must make."""
        t = self.cfg.trainer
        late = t.max_minutes is not None and time.monotonic() - self._fit_started > t.max_minutes * 60
        flags = [float(late), float(self._signal == signal.SIGINT), float(self._signal == signal.SIGTERM)]
        if self.dist.is_distributed:
            flags = all_reduce_sum(torch.tensor(flags, device=self.device)).tolist()
        late, sigint, sigterm = (flag > 0 for flag in flags)
        return late, sigint, sigterm

    def _note_signal(self, sigint: bool, sigterm: bool) -> bool:
        """Record a signal some rank received as the reason to stop (it overrides a limit); True if there is one."""
        if sigint or sigterm:
            self._stop_signal = signal.SIGINT if sigint else signal.SIGTERM
            self.stop_reason = f"interrupted by {signal.Signals(self._stop_signal).name}"
        return self._stop_signal is not None

    def _signal_received(self) -> bool:
        """SIGINT/SIGTERM received by any rank (under DDP a collective: all ranks call it at the same points)."""
        _, sigint, sigterm = self._stop_flags()
        return self._note_signal(sigint, sigterm)

    def _validation_stop_checks(self) -> tuple[int, float]:
        """(every, until): validation looks for a signal before each ``every``-th batch while fewer than ``until``
        have been read. Under DDP the ranks' shards may differ by a batch: checks stop at the smallest shard, so
        every rank makes the same all-reduces."""
        if not self.dist.is_distributed:
            return 1, math.inf  # a flag read, no collective
        counts = torch.zeros(self.dist.world_size, dtype=torch.float64, device=self.device)
        counts[self.dist.rank] = len(self.valid_loader)
        return VALID_STOP_CHECK_EVERY, float(all_reduce_sum(counts).min())

    def _save_last_unless_saved(self) -> None:
        if self._saved_step != self.state.step:  # (a periodic checkpoint may just have been written)
            self._save_last()

    def _save_last(self) -> None:
        """Write last.pt, unless the latest steps were skipped for NaN/inf losses: the weights may be diverged ones
        (the previous last.pt stays)."""
        if self._nonfinite_streak:
            log.warning("%s not updated at step %d: the last %d steps had a NaN/inf loss or gradient", LAST,
                        self.state.step, self._nonfinite_streak)
            return
        self.save_checkpoint(self.exp_dir / LAST)
        self._saved_step = self.state.step

    def train_epoch(self) -> dict[str, float]:
        """Run the rest of the current epoch (or to the step/time limit); return mean loss and grad norm."""
        t, accum = self.cfg.trainer, self.cfg.optim.accum_steps
        per_epoch = self._epoch_batches()  # > 0: checked in _setup
        set_loader_epoch(self.train_loader, self.state.epoch, self.state.batches_done)
        self.train_model.train()
        from tqdm import tqdm

        bar = tqdm(total=per_epoch, initial=self.state.batches_done, desc=f"epoch {self.state.epoch}",
                   unit="batch", disable=True if not self.dist.is_main else bar_disabled(t.progress_bar),
                   leave=False)
        sums = {"grad_norm": 0.0, "steps": 0}
        window = {"loss": 0.0, "n": 0}
        bad = False
        self.optimizer.zero_grad(set_to_none=True)
        iterator = iter(self.train_loader)
        while self.state.batches_done < per_epoch and not self._should_stop():
            batch = next(iterator)
            self.state.batches_done += 1
            self.state.skipped_files += int(batch["skipped"])
            last_micro = self.state.batches_done % accum == 0
            empty = batch["mix"].shape[0] == 0  # every file of the batch was unreadable (data.skip_bad_files)
            if empty and self.dist.is_distributed:
                # The other ranks wait in DDP's gradient all-reduce and in _all_finite: take part with a
                # zero-weight pass on silence, or the job hangs.
                n = self.model.min_input_length
                batch = {"mix": torch.zeros(1, n), "lengths": torch.tensor([n])}
            if not empty or self.dist.is_distributed:
                batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                         for k, v in batch.items()}
                sync = last_micro or not self.dist.is_distributed
                no_sync = contextlib.nullcontext() if sync else self.train_model.no_sync()
                with no_sync:
                    mix, sources, lengths = _fit_to_model(batch["mix"], batch.get("sources"), batch["lengths"],
                                                          self.model.min_input_length)
                    if sources is not None:
                        batch = {**batch, "sources": sources}
                    with self._autocast():
                        est = self.train_model(mix, lengths)
                    loss = est.float().sum() * 0.0 if empty else self._loss(est, batch)
                    if self._all_finite(loss.detach()):
                        scaled = loss / accum  # fp16: scaled up against underflow, unscaled in _optimizer_step
                        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                        if not empty:
                            value = float(loss.detach())
                            self.state.epoch_loss_sum += value
                            self.state.epoch_loss_count += 1
                            window["loss"] += value
                            window["n"] += 1
                    else:
                        bad = True
            bar.update(1)
            if not last_micro:
                continue
            grad_norm = self._optimizer_step(bad)
            bad = False
            if math.isfinite(grad_norm):
                sums["grad_norm"] += grad_norm
                sums["steps"] += 1
            step = self.state.step
            if step % t.log_every_steps == 0 and window["n"]:
                mean = window["loss"] / window["n"]
                bar.set_postfix(loss=f"{mean:.2f}", lr=f"{self.lr:.2e}")
                log.info("epoch %d step %d: loss %.3f, grad norm %s, lr %.3g", self.state.epoch, step, mean,
                         f"{grad_norm:.3g}" if math.isfinite(grad_norm) else "- (step skipped)", self.lr)
                if self.writer is not None:
                    self.writer.add_scalar("train/loss", mean, step)
                    if math.isfinite(grad_norm):
                        self.writer.add_scalar("train/grad_norm", grad_norm, step)
                    self.writer.add_scalar("train/lr", self.lr, step)
                    self.writer.add_scalar("train/skipped_steps", self.state.skipped_steps, step)
                window = {"loss": 0.0, "n": 0}
            if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
                self._save_last()
        bar.close()
        # The epoch's loss over all ranks (the per-step log lines show rank 0's); NaN when every step was skipped.
        loss_sum, count = self._sum_over_ranks(self.state.epoch_loss_sum, self.state.epoch_loss_count)
        return {"loss": loss_sum / count if count else math.nan,
                "grad_norm": sums["grad_norm"] / max(sums["steps"], 1)}

    def _sum_over_ranks(self, *values: float) -> list[float]:
        return all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        """Mean loss, SI-SDR and SI-SDRi (dB) over the whole validation set (all ranks' shards); None when a
        SIGINT/SIGTERM during :meth:`fit` cut it short (a full validation can outlast a preemption's grace time)."""
        model = self.eval_model
        model.eval()
        # loss, si_sdr, si_sdri, count: summed on the device, read once at the end (no per-batch sync)
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        examples_left = self.cfg.trainer.audio_examples if self.writer is not None else 0
        skipped = 0  # counted only once the validation is complete (an interrupted one is done again)
        check_every, checks_until = self._validation_stop_checks()
        for index, batch in enumerate(self.valid_loader):
            if index % check_every == 0 and index < checks_until and self._signal_received():
                return None
            skipped += int(batch["skipped"])
            if batch["mix"].shape[0] == 0:
                continue
            mix, ref, lengths = (batch[k].to(self.device) for k in ("mix", "sources", "lengths"))
            mix, ref, model_lengths = _fit_to_model(mix, ref, lengths, model.min_input_length)
            with self._autocast():
                est = model(mix, model_lengths)
            est = est.float()
            plain, perm = pit_si_sdr_loss(est, ref, lengths, reduction="none")  # unclamped: -SI-SDR
            clamp = self.cfg.optim.loss_clamp_db
            loss = plain if clamp is None else pit_si_sdr_loss(est, ref, lengths, clamp, reduction="none")[0]
            mix_sdr = si_sdr(mix[:, None, :].expand_as(ref), ref, lengths).mean(-1)
            totals += torch.stack([loss.sum(), -plain.sum(), (-plain - mix_sdr).sum(),
                                   loss.new_tensor(float(len(loss)))]).double()
            logged = min(examples_left, mix.shape[0])
            aligned = reorder_estimates(est[:logged], perm[:logged]) if logged else est[:0]  # references' order
            for i in range(logged):
                self._log_audio(batch["ids"][i], mix[i, :lengths[i]], aligned[i, :, :lengths[i]],
                                ref[i, :, :lengths[i]])
            examples_left -= min(examples_left, mix.shape[0])
        self.state.skipped_files += skipped
        totals = all_reduce_sum(totals).cpu()
        count = max(float(totals[3]), 1.0)
        return {"loss": float(totals[0]) / count, "si_sdr": float(totals[1]) / count,
                "si_sdri": float(totals[2]) / count, "count": float(totals[3])}

    def _log_audio(self, name: str, mix: torch.Tensor, est: torch.Tensor, ref: torch.Tensor) -> None:
        """TensorBoard audio of one validation example: the estimates ``[S, T]`` (in the order of the references)
        at every validation; the mixture and the references once per run (they do not change)."""
        peak = float(torch.cat([mix.abs().flatten(), est.abs().flatten()]).max()) + 1e-8  # NaN / inf carry through
        if not math.isfinite(peak):
            return  # a diverged model (reported with the scores): NaN cannot be written as 16-bit audio
        sr, step = self.cfg.data.sample_rate, self.state.step
        if name not in self._audio_logged:  # the mixture and references at one level of their own
            self._audio_logged.add(name)
            level = float(torch.cat([mix.abs().flatten(), ref.abs().flatten()]).max()) + 1e-8
            self.writer.add_audio(f"valid/{name}/mix", (mix / level).cpu(), step, sample_rate=sr)
            for s in range(ref.shape[0]):
                self.writer.add_audio(f"valid/{name}/reference{s + 1}", (ref[s] / level).cpu(), step,
                                      sample_rate=sr)
        for s in range(est.shape[0]):
            self.writer.add_audio(f"valid/{name}/s{s + 1}", (est[s] / peak).cpu(), step, sample_rate=sr)

    def _end_epoch(self, train_stats: dict[str, float]) -> bool:
        """Validate, update best / plateau / early stopping, checkpoint. Returns True to stop training."""
        s = self.state
        start = time.time()
        valid = self.validate()
        if valid is None:  # a signal during validation: saved as trained but not validated, which a resume redoes
            self._save_last_unless_saved()
            return True
        skipped_files = int(self._sum_over_ranks(s.skipped_files)[0]) + self.preload_skipped
        metric = valid["si_sdri"]
        improved = metric > s.best_metric
        if improved:
            s.best_metric, s.best_epoch, s.bad_epochs = metric, s.epoch, 0
        else:
            s.bad_epochs += 1
        self.scheduler.step(metric)
        s.history.append({"epoch": float(s.epoch), "step": float(s.step), "train_loss": train_stats["loss"],
                          "valid_loss": valid["loss"], "valid_si_sdr": valid["si_sdr"], "valid_si_sdri": metric,
                          "lr": self.lr})
        log.info("epoch %d done (step %d): train loss %.3f | valid loss %.3f, SI-SDR %.2f dB, SI-SDRi %.2f dB "
                 "(%s) | lr %.3g | %d skipped steps, %d skipped file reads | valid %.1fs",
                 s.epoch, s.step, train_stats["loss"], valid["loss"], valid["si_sdr"], metric,
                 f"best {s.best_metric:.2f} at epoch {s.best_epoch}" if s.best_epoch >= 0 else "no best yet",
                 self.lr, s.skipped_steps, skipped_files, time.time() - start)
        if math.isnan(train_stats["loss"]):  # the weights did not change this epoch
            log.warning("epoch %d: every training step was skipped (NaN / inf loss or gradients)", s.epoch)
        if not math.isfinite(metric):
            log.warning("epoch %d: validation SI-SDRi is %s (the model diverged?)", s.epoch, metric)
        if self.writer is not None:
            for key in ("loss", "si_sdr", "si_sdri"):
                self.writer.add_scalar(f"valid/{key}", valid[key], s.step)
            self.writer.add_scalar("train/epoch_loss", train_stats["loss"], s.step)
            self.writer.flush()
        if improved:
            self._write_best()
        s.epoch += 1
        s.batches_done = 0
        s.epoch_loss_sum, s.epoch_loss_count = 0.0, 0
        self._save_last()
        if self._early_stopped():
            log.info("early stopping: no validation improvement for %d epochs", s.bad_epochs)
            return True
        return False

    def _early_stopped(self) -> bool:
        patience = self.cfg.optim.early_stop_patience
        return patience is not None and self.state.bad_epochs >= patience

    def _finished(self) -> bool:
        """All epochs trained, or stopped early (checked before each epoch: a rerun of a finished run trains
        nothing)."""
        return self.state.epoch >= self.cfg.trainer.max_epochs or self._early_stopped()

    def fit(self) -> TrainState:
        """Train until ``max_epochs``, ``max_steps``, ``max_minutes`` or early stopping; return the final state.

        SIGINT/SIGTERM: the run stops after the current optimizer step, saves last.pt and raises
        :class:`TrainingInterrupted` (a KeyboardInterrupt)."""
        t = self.cfg.trainer
        self._fit_started, self._stop_checked_at = time.monotonic(), None
        self.stop_reason, self._stop_signal, self._signal = None, None, None
        if self._finished():
            log.info("%s: already finished (epoch %d of %d%s)", self.exp_dir, self.state.epoch, t.max_epochs,
                     f"; stopped early after {self.state.bad_epochs} epochs without improvement"
                     if self._early_stopped() else "")
        else:
            world, batch, accum = self.dist.world_size, self.cfg.data.batch_size, self.cfg.optim.accum_steps
            log.info("training in %s: epochs %d-%d, %d batches per epoch%s; %d examples per optimizer step (%d "
                     "process(es) x batch %d x optim.accum_steps %d)", self.exp_dir, self.state.epoch,
                     t.max_epochs - 1, batches_per_epoch(self.train_loader), " per process" if world > 1 else "",
                     world * batch * accum, world, batch, accum)
        try:
            with stop_signals(self._request_stop):
                self._train_epochs()
        except Exception as err:  # the command prints it; train.log, the run's record, would end mid-sentence
            self._log_to_file(f"stopped by an error at epoch {self.state.epoch}, step {self.state.step} "
                              f"({self._saved_summary()}): {type(err).__name__}: {err}")
            raise
        finally:
            self._signal = None  # received during this fit(): a later validate() must not stop for it
            self.close()
        return self.state

    def _log_to_file(self, message: str) -> None:
        """An ERROR line in train.log only (rank 0's; the exception itself reaches the terminal)."""
        if self._log_handler is not None:
            self._log_handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None))

    def _saved_summary(self) -> str:
        """What last.pt holds now, for an error's record."""
        return (f"{LAST} holds step {self._saved_step}" if self._saved_step is not None
                else f"no {LAST} saved by this run")

    def _train_epochs(self) -> None:
        while not self._finished():
            if self._should_stop():
                break
            with logging_redirect_tqdm():  # log lines are printed above the progress bar, not glued onto it
                stats = self.train_epoch()
            # Stopped mid-epoch, or a signal in the epoch's last step: save (resumable from here) and stop before
            # the validation, which a preemption's grace time may not cover. (A resumed run validates first.)
            mid_epoch = self.state.batches_done < self._epoch_batches()
            if mid_epoch or (self._should_stop() and self._stop_signal is not None):
                self._save_last_unless_saved()
                break
            if self._end_epoch(stats):
                break
        if self.stop_reason is None:
            log.info("finished at epoch %d, step %d; %s", self.state.epoch, self.state.step, best_summary(self.state))
        elif self._stop_signal is None:
            log.info("stopped: %s", self.stop_summary())
        else:
            if self.dist.is_main:  # the rank that saved says so (the others warn of their own troubles only)
                log.warning("%s", self.stop_summary())
            raise TrainingInterrupted(self._stop_signal, self.stop_summary())

    def stop_summary(self) -> str:
        """Why and where fit() stopped before the end, what last.pt holds and how to go on."""
        s, last = self.state, self.exp_dir / LAST
        if not s.batches_done:
            where = f"before epoch {s.epoch}"
        elif s.batches_done < self._epoch_batches():
            where = f"mid-epoch {s.epoch}"
        else:  # a signal in the epoch's last step or during its validation
            where = f"end of epoch {s.epoch}, before its validation"
        if self._saved_step == s.step:
            saved = f"state saved to {last}"
        elif self._saved_step is not None:
            saved = f"{last} keeps step {self._saved_step} (the later steps had NaN/inf losses)"
        else:
            saved = "nothing saved"
        how = ("raise trainer.max_steps (or set it to null) and run again to continue"
               if self.stop_reason and self.stop_reason.startswith("trainer.max_steps")
               else "run the same command to continue")
        return f"{self.stop_reason} at step {s.step} ({where}): {saved}; {how}"

    def _request_stop(self, signum: int) -> None:
        self._signal = signum

    def _epoch_batches(self) -> int:
        """Batches of one epoch that make whole optimizer steps (leftovers would make a partial step)."""
        accum = self.cfg.optim.accum_steps
        return self._batches_per_epoch() // accum * accum

    def _batches_per_epoch(self) -> int:
        """Of the training loader; for a Trainer made without one (``loaders=(None, None)``, to inspect or save
        state), as many as a whole optimizer step needs."""
        return batches_per_epoch(self.train_loader) if self.train_loader is not None else self.cfg.optim.accum_steps

    def close(self, remove_created_folder: bool = False) -> None:
        """Flush and close the TensorBoard writer and the log file, release the folder's lock (idempotent);
        ``remove_created_folder``: see ``ExperimentLock.release``."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if self._lock is not None:
            self._lock.release(remove_created_folder=remove_created_folder)
            self._lock = None


def best_summary(state: TrainState) -> str:
    """``best validation SI-SDRi 9.87 dB (epoch 3)``, or that no epoch has been validated (or none finitely)."""
    if state.best_epoch < 0 and state.history:  # only NaN scores: no epoch is ever better than -inf
        return f"validation SI-SDRi was NaN in all {len(state.history)} validated epochs (the model diverged?)"
    if state.best_epoch < 0:
        return "no validation yet (the run stopped before its first epoch ended)"
    return f"best validation SI-SDRi {state.best_metric:.2f} dB (epoch {state.best_epoch})"


# Data settings that leave the validation scores as they were, and those that leave the training examples of an
# epoch as they were (changed on resume, the others make a warning say what no longer holds). data.batch_size: a
# resume converts the epoch's position itself (_continue_epoch_in_this_layout).
DATA_KEYS_KEEPING_VALIDATION = {
    "data.train", "data.segment_seconds", "data.batch_size", "data.valid_batch_size", "data.num_workers",
    "data.cache_audio", "data.skip_bad_files", "data.dynamic_mixing.train_utterances",
    "data.dynamic_mixing.examples_per_epoch", "data.dynamic_mixing.speed_perturb",
    "data.dynamic_mixing.random_polarity"}
DATA_KEYS_KEEPING_TRAINING_EXAMPLES = {
    "data.valid", "data.max_valid_seconds", "data.valid_batch_size", "data.batch_size", "data.num_workers",
    "data.cache_audio", "data.skip_bad_files", "data.dynamic_mixing.valid_utterances",
    "data.dynamic_mixing.valid_examples", "data.dynamic_mixing.valid_max_seconds"}


def _changed_settings(old: dict[str, Any], new: dict[str, Any], prefix: str) -> list[str]:
    """``["data.batch_size 4 -> 8", ...]``: the settings of ``new`` that ``old`` (a saved config section) holds
    with another value, nested sections by their dotted names (keys the old config lacks are new options)."""
    changed = []
    for key, value in new.items():
        if key not in old or old[key] == value:
            continue
        if isinstance(value, dict) and isinstance(old[key], dict):
            changed += _changed_settings(old[key], value, f"{prefix}.{key}")
        else:
            changed.append(f"{prefix}.{key} {old[key]!r} -> {value!r}")
    return changed


def _with_defaults(saved: Any) -> Any:
    """A saved model config with the options it predates at their defaults (an option added since then, at its
    default, is the same network); as saved where it does not parse (e.g. an option from a newer version)."""
    if not isinstance(saved, dict):
        return saved
    try:
        return MossFormer2Config.from_dict(saved).to_dict()
    except (TypeError, ValueError):  # ConfigError is a ValueError
        return saved


def _train_state(saved: dict[str, Any], path: str | Path) -> TrainState:
    """The saved counters; ones this version does not know (a newer version's) are named and dropped."""
    known = {f.name for f in dataclasses.fields(TrainState)}
    unknown = sorted(set(saved) - known)
    if unknown:
        log.warning("%s holds training counters this version does not know (%s): they are ignored", path,
                    ", ".join(unknown))
    return TrainState(**{key: value for key, value in saved.items() if key in known})


def _config_diff(old: Any, new: dict[str, Any]) -> str:
    """``model.num_mossformer_layer: 1 in the checkpoint, 2 in the config; ...`` for the keys that differ."""
    if not isinstance(old, dict):
        return f"the checkpoint holds no model config (found {type(old).__name__})"
    missing = "(not set)"
    return "; ".join(f"model.{key}: {old.get(key, missing)!r} in the checkpoint, {new.get(key, missing)!r} in "
                     "the config" for key in sorted(set(old) | set(new), key=str)
                     if old.get(key, missing) != new.get(key, missing))


def _fit_to_model(mix: torch.Tensor, sources: torch.Tensor | None, lengths: torch.Tensor, min_length: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A batch ``mix [B, T]`` / ``sources [B, S, T]`` shorter than the network's minimum input zero-padded to it,
    and the lengths the model takes (each at least the minimum; None when nothing is padded). The loss and the
    scores keep the true ``lengths``: utterances that short are scored on their own samples."""
    short = min_length - mix.shape[-1]
    if short > 0:
        mix = torch.nn.functional.pad(mix, (0, short))
        sources = None if sources is None else torch.nn.functional.pad(sources, (0, short))
    return mix, sources, _padded_lengths(lengths.clamp(min=min_length), mix)


def _padded_lengths(lengths: torch.Tensor, mix: torch.Tensor) -> torch.Tensor | None:
    """The true lengths of a zero-padded batch (the model then ignores the padding), or None if none is padded."""
    return lengths if bool((lengths < mix.shape[-1]).any()) else None

"""The trainer's checkpoints beyond the weights: the counters (:class:`TrainState`), every rank's RNG state, and how a
resume or ``trainer.init_from`` reconciles a saved checkpoint with this run's config.

A resume refuses another network, applies changed optimizer settings, and applies changed data settings or another
data layout (processes x batch size) with a warning that says what no longer holds. These are functions of the
saved state and the current config; :class:`~mossformer2.training.trainer.Trainer` gathers, loads and applies.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mossformer2.checkpoint import load_model, read_checkpoint
from mossformer2.config_utils import setting_changes, to_dict
from mossformer2.distributed import DistInfo
from mossformer2.hub import TRAINER_BEST, checkpoint_path
from mossformer2.models import MossFormer2, MossFormer2Config
from mossformer2.training.config import OptimConfig, TrainConfig, absolute_path
from mossformer2.utils import with_context

log = logging.getLogger("mossformer2.training")


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
RANK_SUMS = ("skipped_files", "epoch_loss_sum", "epoch_loss_count")

# What a checkpoint needs to resume a run (best.pt and exported models hold the weights only).
RESUMABLE_KEYS = ("model", "optimizer", "scheduler", "trainer_state", "rng_states")


def best_summary(state: TrainState) -> str:
    """``best validation SI-SDRi 9.87 dB (epoch 3)``, or that no epoch has been validated (or none finitely)."""
    if state.best_epoch < 0 and state.history:  # only NaN scores: no epoch is ever better than -inf
        return f"validation SI-SDRi was NaN in all {len(state.history)} validated epochs (the model diverged?)"
    if state.best_epoch < 0:
        return "no validation yet (the run stopped before its first epoch ended)"
    return f"best validation SI-SDRi {state.best_metric:.2f} dB (epoch {state.best_epoch})"


# ---------------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore_rng_state(saved: list[dict[str, Any]], rank: int, seed: int, step: int) -> None:
    """Continue this rank's saved random stream; a rank the saved run did not have (resumed on more processes)
    gets one of its own from the seed, its rank and the step (rank 0's would repeat its dropout masks)."""
    if rank < len(saved):
        set_rng_state(saved[rank])
        return
    seed_everything(seed + rank + 7919 * step)
    log.info("rank %d was not in the saved run (%d ranks): its random stream starts from the seed, its rank and "
             "the step", rank, len(saved))


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_over_ranks(state: TrainState, dist: DistInfo) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every rank's RNG state (rank order) and the :data:`RANK_SUMS` counters summed over the ranks, for a
    checkpoint. Under DDP a collective: every rank must call it."""
    rng_states = [rng_state()]
    sums = {key: getattr(state, key) for key in RANK_SUMS}
    if dist.is_distributed:
        gathered: list[Any] = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, (rng_states[0], sums))
        rng_states = [g[0] for g in gathered]
        sums = {key: sum(g[1][key] for g in gathered) for key in RANK_SUMS}
    return rng_states, sums


# ---------------------------------------------------------------------------------------------------- model configs
def model_config_with_defaults(saved: Any) -> Any:
    """A saved model config with the options it predates at their defaults (an option added since then, at its
    default, is the same network); as saved where it does not parse (e.g. an option from a newer version)."""
    if not isinstance(saved, dict):
        return saved
    try:
        return MossFormer2Config.from_dict(saved).to_dict()
    except (TypeError, ValueError):  # ConfigError is a ValueError
        return saved


def model_config_diff(old: Any, new: dict[str, Any]) -> str:
    """``model.num_mossformer_layer: 1 in the checkpoint, 2 in the config; ...`` for the keys that differ."""
    if not isinstance(old, dict):
        return f"the checkpoint holds no model config (found {type(old).__name__})"
    return "; ".join(f"{key}: {before!r} in the checkpoint, {after!r} in the config"
                     for key, before, after in setting_changes(old, new, "model"))


def load_pretrained(path: str, config: MossFormer2Config) -> MossFormer2:
    """``trainer.init_from``'s network (official checkpoint or ours: a file, a folder holding one, a hub id or a
    model name such as ``default``, as ``separate --checkpoint`` / ``--model`` take them), refused unless it is of
    the configured architecture."""
    ckpt: dict[str, Any] = {}
    try:
        file = checkpoint_path(path)
        ckpt = read_checkpoint(file)
        return load_model(ckpt, config=config, source=file)
    except (ValueError, FileNotFoundError) as err:
        # Our checkpoints embed their model config: the keys that differ say more than 40 missing weight names.
        embedded = ckpt.get("config")
        diff = model_config_diff(embedded, config.to_dict()) if isinstance(embedded, dict) else ""
        why = f"the checkpoint's model config differs from the config's ({diff})" if diff else str(err)
        raise with_context(err, f"trainer.init_from {path}: {why}") from None


def check_resumable(ckpt: dict[str, Any], path: str | Path, config: MossFormer2Config) -> None:
    """Refuse a checkpoint that cannot resume this run: not a training state, or of another network."""
    missing = [k for k in RESUMABLE_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a resumable training checkpoint (missing {missing}); use "
                         "trainer.init_from to start from its weights")
    saved_model = model_config_with_defaults(ckpt.get("config"))
    if saved_model != config.to_dict():
        diff = model_config_diff(saved_model, config.to_dict())
        raise ValueError(f"{path} was trained with another model config ({diff}); use another --exp-dir for "
                         "this model (or trainer.resume=false to start afresh here: the current run's files are "
                         "then moved to a replaced-<time>/ subfolder)")


# ---------------------------------------------------------------------------------------------------- counters
def resumed_train_state(saved: dict[str, Any], path: str | Path, rank: int) -> TrainState:
    """This rank's counters from a checkpoint's ``trainer_state``: rank 0 goes on from the :data:`RANK_SUMS` totals
    over all ranks, the others from 0. Counters this version does not know (a newer version's) are named and
    dropped."""
    known = {f.name for f in dataclasses.fields(TrainState)}
    unknown = sorted(set(saved) - known)
    if unknown and rank == 0:  # said once for all ranks
        log.warning("%s holds training counters this version does not know (%s): they are ignored", path,
                    ", ".join(unknown))
    state = TrainState(**{key: value for key, value in saved.items() if key in known})
    if rank > 0:
        state = dataclasses.replace(state, **dict.fromkeys(RANK_SUMS, 0))
    return state


def continue_epoch_in_layout(state: TrainState, layout: tuple[int, int], accum: int, saved_accum: int | None,
                             path: str | Path, *, is_main: bool) -> None:
    """Express a mid-epoch ``state.batches_done`` saved by a run with another ``layout`` (processes, batch size) or
    optim.accum_steps in this run's batches: the examples of the epoch already used are skipped as closely as whole
    steps allow. Every rank takes every world_size-th example of one shuffled epoch order, so the examples used
    are the first ``batches_done x world_size x batch_size`` of it whatever the layout. Sets ``state``'s layout
    to ``layout``; ``is_main``: the rank that warns of another effective batch (once for all ranks)."""
    s, new = state, layout
    old = (s.world_size, s.batch_size) if s.world_size and s.batch_size else new  # older checkpoints: unknown
    s.world_size, s.batch_size = new
    before, after = old[0] * old[1] * (saved_accum or accum), new[0] * new[1] * accum
    if before != after and is_main:
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


# ---------------------------------------------------------------------------------------------------- changed settings
def changed_settings(old: dict[str, Any], new: dict[str, Any], prefix: str) -> list[tuple[str, Any, Any]]:
    """The settings of ``new`` that ``old`` (a saved config section) holds with another value, as ``(dotted key,
    old, new)`` (keys the old config lacks are new options, not changes)."""
    return setting_changes(old, new, prefix, shared_only=True)


def _described(changes: list[tuple[str, Any, Any]]) -> str:
    """``data.batch_size 4 -> 8; ...``"""
    return "; ".join(f"{key} {before!r} -> {after!r}" for key, before, after in changes)


def apply_optim_settings(saved: dict[str, Any], o: OptimConfig, optimizer: torch.optim.Optimizer,
                         scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau, path: str | Path) -> None:
    """After loading a checkpoint's optimizer/scheduler states (which hold the settings of the run that wrote it),
    apply this config's ``o``, so that config.yaml tells what runs. The lr is only set when ``optim.lr`` changed:
    otherwise the checkpoint's (maybe plateau-reduced) lr goes on. ``saved``: the checkpoint's train config."""
    old = saved.get("optim", {})
    changed = changed_settings(old, to_dict(o), "optim")
    if changed:
        lr = float(optimizer.param_groups[0]["lr"])
        log.warning("resuming %s with changed settings: %s%s", path, _described(changed),
                    f" (the lr was {lr:.3g})" if old.get("lr", o.lr) != o.lr else "")
    for group in optimizer.param_groups:
        group.update(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                     decoupled_weight_decay=o.decoupled_weight_decay)
        if old.get("lr", o.lr) != o.lr:
            group["lr"] = o.lr
    scheduler.factor, scheduler.patience = o.plateau_factor, o.plateau_patience
    scheduler.default_min_lr = o.min_lr
    scheduler.min_lrs = [o.min_lr] * len(optimizer.param_groups)
    # (grad_clip, accum_steps, loss_clamp_db and early_stop_patience are read from the config when used.)


def with_init_from_as_started(saved: dict[str, Any], cfg: TrainConfig, path: str | Path) -> TrainConfig:
    """``cfg`` with the ``trainer.init_from`` the resumed run started from: it only initialises a new run, so on
    resume this config's is ignored (with a warning), and config.yaml keeps the value the run started from."""
    started_from = saved.get("trainer", {}).get("init_from")
    if started_from and os.path.isabs(os.path.expanduser(started_from)):  # normalised as this config's is
        started_from = absolute_path(started_from)
    # (older checkpoints hold it as given: a relative one is kept so, its launch folder is unknown)
    if cfg.trainer.init_from == started_from:
        return cfg
    if cfg.trainer.init_from:
        log.warning("trainer.init_from %s is ignored: resuming from %s (to start from it, use another "
                    "--exp-dir, or trainer.resume=false: the current run's files are then moved to a "
                    "replaced-<time>/ subfolder)", cfg.trainer.init_from, path)
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, init_from=started_from))


# Data settings that leave the validation scores as they were, and those that leave the training examples of an
# epoch as they were (changed on resume, the others make a warning say what no longer holds). data.batch_size: a
# resume converts the epoch's position itself (continue_epoch_in_layout).
DATA_KEYS_KEEPING_VALIDATION = {
    "data.train", "data.segment_seconds", "data.batch_size", "data.valid_batch_size", "data.num_workers",
    "data.cache_audio", "data.skip_bad_files", "data.dynamic_mixing.train_utterances",
    "data.dynamic_mixing.examples_per_epoch", "data.dynamic_mixing.speed_perturb",
    "data.dynamic_mixing.random_polarity"}
DATA_KEYS_KEEPING_TRAINING_EXAMPLES = {
    "data.valid", "data.max_valid_seconds", "data.valid_batch_size", "data.batch_size", "data.num_workers",
    "data.cache_audio", "data.skip_bad_files", "data.dynamic_mixing.valid_utterances",
    "data.dynamic_mixing.valid_examples", "data.dynamic_mixing.valid_max_seconds"}


def warn_changed_data(saved: dict[str, Any], cfg: TrainConfig, state: TrainState, epoch_batches: int | None,
                      path: str | Path) -> None:
    """Changed ``data.*`` settings (and ``trainer.seed``, which draws the mixtures) apply on resume (after the
    state is loaded): say which, and what no longer holds with them: the position in the epoch (other training
    data) and the best score so far (another validation set). ``saved``: the checkpoint's train config;
    ``epoch_batches``: the batches of an epoch with this config (None: no training data loaded)."""
    changed = changed_settings(saved.get("data") or {}, to_dict(cfg.data), "data")
    changed += changed_settings(saved.get("trainer") or {}, {"seed": cfg.trainer.seed}, "trainer")
    if not changed:
        return
    log.warning("resuming %s with changed data settings: %s", path, _described(changed))
    keys = {key for key, _, _ in changed}
    s = state
    if epoch_batches is not None and s.batches_done >= epoch_batches > 0:
        log.warning("epoch %d had used %d batches, and has %d with these settings: it ends without further "
                    "steps", s.epoch, s.batches_done, epoch_batches)
    elif s.batches_done and keys - DATA_KEYS_KEEPING_TRAINING_EXAMPLES:
        log.warning("epoch %d goes on after its first %d batches, which with these settings are other "
                    "examples than those trained on", s.epoch, s.batches_done)
    keeping = set(DATA_KEYS_KEEPING_VALIDATION)
    if cfg.data.valid:  # a pre-mixed validation set: the mixing settings shape the training data only
        keeping |= {key for key in keys if key.startswith("data.dynamic_mixing.")}
        if cfg.data.max_valid_seconds is None:  # ... and uncropped, the seed too
            keeping.add("trainer.seed")
    if keys - keeping and s.best_epoch >= 0:
        log.warning("the validation data may have changed: the best score so far (%.2f dB, epoch %d, in %s) "
                    "was measured on the earlier set, and later epochs are compared with it", s.best_metric,
                    s.best_epoch, TRAINER_BEST)

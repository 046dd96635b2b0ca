"""The training loop: PIT SI-SDR loss, Adam, accumulation, plateau halving, early stopping, an optional moving
average of the weights, exact resume, DDP.

Counters: ``step`` counts optimizer steps (including skipped ones), ``epoch`` is the epoch in progress and
``batches_done`` the micro-batches of it already consumed. A checkpoint taken after any optimizer step holds
these, the RNG states, the optimizer/scheduler/scaler states and the weight average, so a resumed run continues
exactly where the interrupted one stopped and ends with bit-identical weights (on CPU; cuDNN/NCCL may add
nondeterminism on GPU). SIGINT (Ctrl-C) or SIGTERM (preemption) during :meth:`Trainer.fit` stops the run after the
current optimizer step with such a checkpoint saved.

Beside the loop: :mod:`.checkpointing` (what a checkpoint holds, how a resume reconciles it with the config),
:mod:`.stopping` (limits, signals, divergence), :mod:`.run_log` (train.log, TensorBoard).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

from mossformer2.checkpoint import read_checkpoint, save_checkpoint
from mossformer2.config_utils import to_dict
from mossformer2.data.loaders import batches_per_epoch, create_dataloaders, prepare_synthetic_data, set_loader_epoch
from mossformer2.distributed import DistInfo, all_reduce_sum, barrier, get_dist_info
from mossformer2.hub import TRAINER_BEST, TRAINER_LAST
from mossformer2.losses import pit_si_sdr_loss, reorder_estimates, si_sdr
from mossformer2.models import MossFormer2, build_model, count_parameters
from mossformer2.separation_settings import recommended_refinements
from mossformer2.training.checkpointing import (
    TrainState,
    apply_optim_settings,
    best_summary,
    check_resumable,
    continue_epoch_in_layout,
    gather_over_ranks,
    load_pretrained,
    restore_rng_state,
    resumed_train_state,
    seed_everything,
    warn_changed_data,
    with_init_from_as_started,
)
from mossformer2.training.config import TrainConfig, absolute_path, save_train_config, with_absolute_paths
from mossformer2.training.experiment import ExperimentLock, TrainingInterrupted, move_previous_run_aside, stop_signals
from mossformer2.training.run_log import RunLog
from mossformer2.training.stopping import DivergenceGuard, StopController, TrainingDivergedError
from mossformer2.utils import bar_disabled, resolve_device

__all__ = ["BEST", "LAST", "TrainState", "Trainer", "TrainingDivergedError", "best_summary", "log"]

log = logging.getLogger("mossformer2.training")

LAST, BEST = TRAINER_LAST, TRAINER_BEST  # one definition: hub.py takes best.pt from a trainer's folder
# Under DDP, validation looks for a stop signal every this many batches (an all-reduce, which syncs the device).
VALID_STOP_CHECK_EVERY = 10


class Trainer:
    """Trains a MossFormer2 per a :class:`TrainConfig`, writing checkpoints and logs to ``exp_dir``.

    ``loaders`` (train, valid) may be given (tests); by default they come from :func:`create_dataloaders`.
    Only rank 0 writes files. Call :meth:`fit`.
    """

    def __init__(self, cfg: TrainConfig, exp_dir: str | Path,
                 loaders: tuple[DataLoader | None, DataLoader | None] | None = None,
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
        if t.cpu_threads:  # before any work of this run
            torch.set_num_threads(t.cpu_threads)
        self.resuming = t.resume and (self.exp_dir / LAST).is_file()
        # Read and checked against the model config before the data is read (minutes with data.cache_audio) and
        # before the experiment folder is made; applied once the model is built.
        self._pretrained = load_pretrained(t.init_from, self.cfg.model) if t.init_from and not self.resuming else None
        if self.device.type == "cpu":
            # Subnormal floats appear in activations/gradients as training goes on and make x86 CPUs 10x+
            # slower; flushing them to zero changes nothing measurable in the results. (Intra-op worker
            # threads copy this mode only when created: `mossformer2 train` sets it before any torch op.)
            torch.set_flush_denormal(True)
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]
        self.run_log = RunLog(self.exp_dir)  # opened on rank 0 once setup succeeded
        self.stopper = StopController(t, self.dist, self.device)
        self.divergence = DivergenceGuard(t.max_nonfinite_steps)
        self._saved_step: int | None = None  # the step last.pt holds
        self._lock: ExperimentLock | None = None
        self._closed = False
        if self.dist.is_main:
            if log.level == logging.NOTSET or log.level > logging.INFO:
                log.setLevel(logging.INFO)
            self._lock = ExperimentLock(self.exp_dir)  # at once: a second run in this folder fails before any work
            self.run_log.keep_setup_messages()
        else:  # under torchrun, one copy of the progress messages (rank 0's); every rank still warns
            log.setLevel(logging.WARNING)
        try:
            self._setup(loaders)
        except BaseException:
            self.close(remove_created_folder=True)  # and the experiment folder if this start created it
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
        seed_everything(t.seed)  # identical initial weights on every rank
        self.model: MossFormer2 = build_model(self.cfg.model)
        if t.activation_checkpointing:
            self.model.set_activation_checkpointing(True)
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
        self._backward_in_step = False  # a backward ran since the last optimizer step (the GradScaler needs one)
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
            seed_everything(t.seed + self.dist.rank)  # different dropout masks per rank
        if self.dist.is_main:
            self._open_run_files()
            log.info("model: %.2f M parameters on %s, precision %s", count_parameters(self.model) / 1e6, self.device,
                     t.precision)

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
            move_previous_run_aside(self.exp_dir, self.cfg.trainer.resume)
        # TensorBoard drops the points an interrupted run logged after the step this run starts from; step 1 for
        # a rerun of one killed before its first checkpoint.
        self.run_log.open(self.cfg.trainer.tensorboard, purge_step=self.state.step + 1)
        # The run's settings: `--config config.yaml` continues it, also when it was started with trainer.resume=false
        save_train_config(dataclasses.replace(self.cfg, trainer=dataclasses.replace(self.cfg.trainer, resume=True)),
                          self.exp_dir / "config.yaml")

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

    @property
    def stop_reason(self) -> str | None:
        """Why fit() stopped before the end (a limit or a signal); None: it ended."""
        return self.stopper.reason

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path) -> None:
        """Write everything needed to resume (rank 0 writes; every rank must call it under DDP: RNG gather)."""
        rng_states, sums = gather_over_ranks(self.state, self.dist)
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
        """Restore model, optimizer, scheduler, scaler, RNG states and the position in the data; apply this
        config's changed settings (with warnings)."""
        ckpt = read_checkpoint(path)
        check_resumable(ckpt, path, self.cfg.model)
        saved_cfg: dict[str, Any] = ckpt.get("train_config") or {}
        self.model.load_state_dict(ckpt["model"])
        self._set_separation_settings(recommended_refinements(ckpt.get("separation"), path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        apply_optim_settings(saved_cfg, self.cfg.optim, self.optimizer, self.scheduler, path)
        self.cfg = with_init_from_as_started(saved_cfg, self.cfg, path)
        if self.scaler is not None and "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if "ema" in ckpt:
                self.ema.load_state_dict(ckpt["ema"])
            else:
                log.warning("%s holds no weight average: trainer.ema_decay starts one from its weights", path)
                self.ema.module.load_state_dict(ckpt["model"])
        self.state = resumed_train_state(ckpt["trainer_state"], path, self.dist.rank)
        continue_epoch_in_layout(self.state, (self.dist.world_size, self.cfg.data.batch_size),
                                 self.cfg.optim.accum_steps, (saved_cfg.get("optim") or {}).get("accum_steps"),
                                 path, is_main=self.dist.is_main)
        if self.dist.is_main:  # one warning for all ranks
            epoch_batches = self._epoch_batches() if self.train_loader is not None else None
            warn_changed_data(saved_cfg, self.cfg, self.state, epoch_batches, path)
        restore_rng_state(ckpt["rng_states"], self.dist.rank, self.cfg.trainer.seed, self.state.step)

    def _write_best(self) -> None:
        if self.dist.is_main:
            save_checkpoint(self.exp_dir / BEST, self.eval_model, epoch=self.state.epoch, step=self.state.step,
                            extra={"valid": self.state.history[-1], "train_config": to_dict(self.cfg)})

    def _save_last_unless_saved(self) -> None:
        if self._saved_step != self.state.step:  # (a periodic checkpoint may just have been written)
            self._save_last()

    def _save_last(self) -> None:
        """Write last.pt, unless the latest steps were skipped for NaN/inf losses: the weights may be diverged ones
        (the previous last.pt stays)."""
        if self.divergence.streak:
            log.warning("%s not updated at step %d: the last %d steps had a NaN/inf loss or gradient", LAST,
                        self.state.step, self.divergence.streak)
            return
        self.save_checkpoint(self.exp_dir / LAST)
        self._saved_step = self.state.step

    # ------------------------------------------------------------------ training
    def _loss(self, est: torch.Tensor, batch: dict) -> torch.Tensor:
        """The PIT loss (scalar, -SI-SDR in dB, maybe clamped) of ``est [B, S, T]`` against ``batch["sources"]``."""
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
        # A GradScaler steps on the inf checks of a scaled backward: with none in this step (every micro-batch's
        # loss NaN/inf, or an empty batch) it would raise, so the step goes without it (no gradient to unscale).
        scaler = self.scaler if self._backward_in_step else None
        self._backward_in_step = False
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        max_norm = o.grad_clip if o.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        skipped = bad or not self._all_finite(grad_norm)
        if skipped:
            self.state.skipped_steps += 1
            log.warning("step %d skipped: non-finite %s (%d skipped so far)", self.state.step + 1,
                        "loss" if bad else "gradient", self.state.skipped_steps)
            if scaler is not None:
                scaler.update()
            self.divergence.step_skipped(self.state.step + 1, self.exp_dir / LAST, self._saved_step)
        else:
            self.divergence.step_taken()
            if scaler is not None:
                scaler.step(self.optimizer)
                scaler.update()
            else:
                self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return math.nan if skipped else float(grad_norm)

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
        window = {"loss": 0.0, "n": 0}  # losses since the last log line
        bad = False  # a micro-batch of this optimizer step had a NaN/inf loss on some rank
        self.optimizer.zero_grad(set_to_none=True)
        self._backward_in_step = False
        iterator = iter(self.train_loader)
        while self.state.batches_done < per_epoch and not self.stopper.should_stop(self.state):
            batch = next(iterator)
            self.state.batches_done += 1
            self.state.skipped_files += int(batch["skipped"])
            last_micro = self.state.batches_done % accum == 0
            loss = self._micro_step(batch, last_micro)
            if loss is not None and math.isnan(loss):
                bad = True
            elif loss is not None:
                self.state.epoch_loss_sum += loss
                self.state.epoch_loss_count += 1
                window["loss"] += loss
                window["n"] += 1
            bar.update(1)
            if not last_micro:
                continue
            grad_norm = self._optimizer_step(bad)
            bad = False
            if math.isfinite(grad_norm):
                sums["grad_norm"] += grad_norm
                sums["steps"] += 1
            step = self.state.step
            if step % t.log_every_steps == 0:
                # Every rank's losses since the last line (a rank with only empty batches adds none).
                loss_sum, count = self._sum_over_ranks(window["loss"], window["n"])
                if count:
                    self._log_step(loss_sum / count, grad_norm, bar)
                window = {"loss": 0.0, "n": 0}
            if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
                self._save_last()
        bar.close()
        # The epoch's loss over all ranks; NaN when every step was skipped.
        loss_sum, count = self._sum_over_ranks(self.state.epoch_loss_sum, self.state.epoch_loss_count)
        return {"loss": loss_sum / count if count else math.nan,
                "grad_norm": sums["grad_norm"] / max(sums["steps"], 1)}

    def _micro_step(self, batch: dict[str, Any], last_micro: bool) -> float | None:
        """Forward and backward one micro-batch (``mix [B, T]``, ``sources [B, S, T]``, ``lengths [B]``); its
        gradient adds to the optimizer step's, synced across ranks at the step's ``last_micro`` batch. Returns its
        loss; None for an empty batch; NaN when the loss was not finite on some rank (then no backward: the step
        will be skipped)."""
        empty = batch["mix"].shape[0] == 0  # every file of the batch was unreadable (data.skip_bad_files)
        if empty and not self.dist.is_distributed:
            return None
        if empty:
            # The other ranks wait in DDP's gradient all-reduce and in _all_finite: take part with a zero-weight
            # pass on silence, or the job hangs.
            n = self.model.min_input_length
            batch = {"mix": torch.zeros(1, n), "lengths": torch.tensor([n])}
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        sync = last_micro or not self.dist.is_distributed
        with contextlib.nullcontext() if sync else self.train_model.no_sync():
            mix, sources, lengths = fit_to_model(batch["mix"], batch.get("sources"), batch["lengths"],
                                                 self.model.min_input_length)
            if sources is not None:
                batch = {**batch, "sources": sources}
            with self._autocast():
                est = self.train_model(mix, lengths)
            loss = est.float().sum() * 0.0 if empty else self._loss(est, batch)
            if not self._all_finite(loss.detach()):
                return math.nan
            scaled = loss / self.cfg.optim.accum_steps  # fp16: scaled against underflow, unscaled in _optimizer_step
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            self._backward_in_step = True
            return None if empty else float(loss.detach())

    def _log_step(self, loss: float, grad_norm: float, bar: Any) -> None:
        """The progress line of an optimizer step (``loss``: the mean since the last one), and its TensorBoard
        points."""
        step = self.state.step
        bar.set_postfix(loss=f"{loss:.2f}", lr=f"{self.lr:.2e}")
        log.info("epoch %d step %d: loss %.3f, grad norm %s, lr %.3g", self.state.epoch, step, loss,
                 f"{grad_norm:.3g}" if math.isfinite(grad_norm) else "- (step skipped)", self.lr)
        points = {"train/loss": loss}
        if math.isfinite(grad_norm):
            points["train/grad_norm"] = grad_norm
        self.run_log.scalars({**points, "train/lr": self.lr, "train/skipped_steps": self.state.skipped_steps}, step)

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
        examples_left = self.cfg.trainer.audio_examples if self.run_log.tensorboard else 0
        skipped = 0  # counted only once the validation is complete (an interrupted one is done again)
        check_every, checks_until = self.stopper.validation_checks(self.valid_loader, VALID_STOP_CHECK_EVERY)
        for index, batch in enumerate(self.valid_loader):
            if index % check_every == 0 and index < checks_until and self.stopper.signal_received():
                return None
            skipped += int(batch["skipped"])
            if batch["mix"].shape[0] == 0:
                continue
            mix, ref, lengths = (batch[k].to(self.device) for k in ("mix", "sources", "lengths"))
            mix, ref, model_lengths = fit_to_model(mix, ref, lengths, model.min_input_length)
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
                self.run_log.audio(batch["ids"][i], mix[i, :lengths[i]], aligned[i, :, :lengths[i]],
                                   ref[i, :, :lengths[i]], self.state.step, self.cfg.data.sample_rate)
            examples_left -= min(examples_left, mix.shape[0])
        self.state.skipped_files += skipped
        totals = all_reduce_sum(totals).cpu()
        count = max(float(totals[3]), 1.0)
        return {"loss": float(totals[0]) / count, "si_sdr": float(totals[1]) / count,
                "si_sdri": float(totals[2]) / count, "count": float(totals[3])}

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
        self.run_log.scalars({**{f"valid/{key}": valid[key] for key in ("loss", "si_sdr", "si_sdri")},
                              "train/epoch_loss": train_stats["loss"]}, s.step)
        self.run_log.flush()
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
        if self._closed:  # no lock on the folder, no train.log, no TensorBoard any more
            raise RuntimeError(f"this Trainer is closed (fit() closes it when it ends): make a new Trainer for "
                               f"{self.exp_dir} to go on from its last.pt")
        t = self.cfg.trainer
        self.stopper.start()
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
            with stop_signals(self.stopper.request):
                self._train_epochs()
        except Exception as err:  # the command prints it; train.log, the run's record, would end mid-sentence
            self.run_log.error_line(f"stopped by an error at epoch {self.state.epoch}, step {self.state.step} "
                                    f"({self._saved_summary()}): {type(err).__name__}: {err}")
            raise
        finally:
            self.stopper.end()
            self.close()
        return self.state

    def _saved_summary(self) -> str:
        """What last.pt holds now, for an error's record."""
        return (f"{LAST} holds step {self._saved_step}" if self._saved_step is not None
                else f"no {LAST} saved by this run")

    def _train_epochs(self) -> None:
        while not self._finished():
            if self.stopper.should_stop(self.state):
                break
            with logging_redirect_tqdm():  # log lines are printed above the progress bar, not glued onto it
                stats = self.train_epoch()
            # Stopped mid-epoch, or a signal in the epoch's last step: save (resumable from here) and stop before
            # the validation, which a preemption's grace time may not cover. (A resumed run validates first.)
            mid_epoch = self.state.batches_done < self._epoch_batches()
            if mid_epoch or (self.stopper.should_stop(self.state) and self.stopper.agreed_signal is not None):
                self._save_last_unless_saved()
                break
            if self._end_epoch(stats):
                break
        if self.stop_reason is None:
            log.info("finished at epoch %d, step %d; %s", self.state.epoch, self.state.step, best_summary(self.state))
        elif self.stopper.agreed_signal is None:
            log.info("stopped: %s", self.stop_summary())
        else:
            if self.dist.is_main:  # the rank that saved says so (the others warn of their own troubles only)
                log.warning("%s", self.stop_summary())
            raise TrainingInterrupted(self.stopper.agreed_signal, self.stop_summary())

    def stop_summary(self) -> str:
        """Why and where fit() stopped before the end, what last.pt holds and how to go on."""
        return self.stopper.summary(self.state, self._epoch_batches(), self.exp_dir / LAST, self._saved_step,
                                    self.cfg.trainer.resume)

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
        self._closed = True
        self.run_log.close()
        if self._lock is not None:
            self._lock.release(remove_created_folder=remove_created_folder)
            self._lock = None


def fit_to_model(mix: torch.Tensor, sources: torch.Tensor | None, lengths: torch.Tensor, min_length: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A batch ``mix [B, T]`` / ``sources [B, S, T]`` shorter than the network's minimum input zero-padded to it,
    and the lengths ``[B]`` the model takes (each at least the minimum; None when nothing is padded). The loss and
    the scores keep the true ``lengths``: utterances that short are scored on their own samples."""
    short = min_length - mix.shape[-1]
    if short > 0:
        mix = torch.nn.functional.pad(mix, (0, short))
        sources = None if sources is None else torch.nn.functional.pad(sources, (0, short))
    lengths = lengths.clamp(min=min_length)
    return mix, sources, lengths if bool((lengths < mix.shape[-1]).any()) else None

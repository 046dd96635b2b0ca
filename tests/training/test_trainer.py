"""Trainer: exact resume, NaN skipping, accumulation with one clip per step, weight decay, plateau/early stop,
bf16 autocast, activation checkpointing, init_from and checkpoint contents. Tiny model, CPU."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import mossformer2
from mossformer2.config_utils import ConfigError
from mossformer2.data.loaders import prepare_synthetic_data
from mossformer2.training import Trainer
from mossformer2.training.config import load_train_config, train_config_from_dict
from tests.conftest import TRAIN_TINY_MODEL, make_train_config

# One short epoch: 4 examples, one optimizer step per batch, no periodic checkpoint.
FAST = ("data.dynamic_mixing.examples_per_epoch=4", "optim.accum_steps=1", "trainer.checkpoint_every_steps=null")


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def killed_and_resumed(cfg, exp_dir, monkeypatch, kill_at_call: int) -> Trainer:
    """Train in ``exp_dir`` until the ``kill_at_call``-th optimizer step is killed; return the Trainer that
    resumes from what the killed run left (not yet fitted)."""
    calls = {"n": 0}
    original = Trainer._optimizer_step

    def dying_step(self, bad):
        calls["n"] += 1
        if calls["n"] == kill_at_call:
            raise KeyboardInterrupt("killed")
        return original(self, bad)

    monkeypatch.setattr(Trainer, "_optimizer_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, exp_dir).fit()
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    return Trainer(cfg, exp_dir)


@pytest.mark.parametrize("num_workers", [0, 2])  # every shipped config loads in worker processes
@pytest.mark.parametrize("kill_at_call", [7])
def test_killed_and_resumed_run_equals_uninterrupted(train_corpus, tmp_path, monkeypatch, kill_at_call, num_workers):
    # 8 batches per epoch, accum 2 -> 4 optimizer steps per epoch, 8 in all; checkpoints at steps 3 and 6
    # (mid-epoch) and at each epoch end. Killing inside step 7 resumes from step 6, mid-epoch 1.
    cfg = make_train_config(train_corpus, f"data.num_workers={num_workers}")
    reference = Trainer(cfg, tmp_path / "ref")
    reference.fit()
    final = weights(reference.model)
    assert reference.state.step == 8

    resumed = killed_and_resumed(cfg, tmp_path / "run", monkeypatch, kill_at_call)
    assert resumed.state.step == kill_at_call - 1 and resumed.state.batches_done > 0  # mid-epoch
    resumed.fit()
    assert resumed.state.step == 8
    assert_bitwise_equal(final, weights(resumed.model))
    assert resumed.state.history == reference.state.history


def test_checkpoint_contents_and_loadable_weights(train_corpus, tmp_path):
    cfg = make_train_config(train_corpus, "trainer.max_epochs=1", "trainer.tensorboard=true",
                            "trainer.audio_examples=1")
    trainer = Trainer(cfg, tmp_path)
    trainer.fit()
    last = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    for key in ("model", "config", "optimizer", "scheduler", "rng_states", "trainer_state", "train_config",
                "epoch", "step"):
        assert key in last, key
    assert last["trainer_state"]["batches_done"] == 0 and last["epoch"] == 1
    model = mossformer2.load_model(tmp_path / "best.pt")
    assert_bitwise_equal(weights(model), weights(trainer.model))
    assert (tmp_path / "config.yaml").is_file() and "epoch 0 done" in (tmp_path / "train.log").read_text()
    assert any((tmp_path / "tensorboard").iterdir())
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files
    other = make_train_config(train_corpus, "model.num_mossformer_layer=2")
    with pytest.raises(ValueError, match="model config"):
        Trainer(other, tmp_path)


def test_time_limit_stops_mid_epoch_with_a_resumable_state(train_corpus, tmp_path, monkeypatch):
    # A fake clock: one "minute" per optimizer step taken. 4 optimizer steps per epoch; 2.5 minutes stop the
    # run after step 3, mid-epoch 0, and the next run resumes there with a fresh time budget.
    from mossformer2.training import stopping  # reads the clock (time.monotonic)

    cfg = make_train_config(train_corpus, "trainer.max_minutes=2.5", "trainer.checkpoint_every_steps=null")
    trainer = Trainer(cfg, tmp_path)
    monkeypatch.setattr(stopping.time, "monotonic", lambda: 60.0 * trainer.state.step)
    trainer.fit()
    assert trainer.state.step == 3 and trainer.state.epoch == 0
    last = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert last["step"] == 3 and last["trainer_state"]["batches_done"] == 6
    text = (tmp_path / "train.log").read_text()
    # Not the wording of a completed run: which limit, where, and how to go on.
    assert (f"stopped: trainer.max_minutes (2.5) reached at step 3 (mid-epoch 0): state saved to {tmp_path / 'last.pt'}"
            "; run the same command to continue") in text
    assert "finished at epoch" not in text
    # the run's config.yaml continues it, also when it began with trainer.resume=false (its message says so)
    assert load_train_config(tmp_path / "config.yaml").trainer.resume is True
    exp = tmp_path / "afresh"
    fresh = Trainer(make_train_config(train_corpus, "trainer.max_minutes=2.5", "trainer.checkpoint_every_steps=null",
                                      "trainer.resume=false"), exp)
    monkeypatch.setattr(stopping.time, "monotonic", lambda: 60.0 * fresh.state.step)
    fresh.fit()
    assert ("; run the same command to continue with trainer.resume=true (trainer.resume=false would start afresh, "
            "moving this run aside)") in (exp / "train.log").read_text()
    assert load_train_config(exp / "config.yaml").trainer.resume is True

    resumed = Trainer(make_train_config(train_corpus, "trainer.max_minutes=100"), tmp_path)
    monkeypatch.setattr(stopping.time, "monotonic", lambda: 60.0 * resumed.state.step)
    resumed.fit()
    assert resumed.state.step == 8 and resumed.state.epoch == 2  # both epochs completed from step 3
    with pytest.raises(ValueError, match="max_minutes"):
        make_train_config(train_corpus, "trainer.max_minutes=0").validate()


def test_nan_loss_skips_the_step_and_counts_it(train_corpus, tmp_path, monkeypatch):
    cfg = make_train_config(train_corpus, "trainer.max_steps=1", "optim.accum_steps=2")
    trainer = Trainer(cfg, tmp_path)
    before = weights(trainer.model)
    calls = {"n": 0}
    original = Trainer._loss

    def nan_once(self, est, batch):
        calls["n"] += 1
        loss = original(self, est, batch)
        return loss * float("nan") if calls["n"] == 2 else loss  # second micro-batch of the step

    monkeypatch.setattr(Trainer, "_loss", nan_once)
    trainer.fit()
    assert trainer.state.skipped_steps == 1 and trainer.state.step == 1
    assert_bitwise_equal(before, weights(trainer.model))  # the first micro-batch's gradient was dropped too
    assert not trainer.optimizer.state  # Adam moments untouched


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_inf_gradient_skips_the_step(train_corpus, tmp_path, monkeypatch):
    cfg = make_train_config(train_corpus, "trainer.max_steps=2", "optim.accum_steps=1")
    trainer = Trainer(cfg, tmp_path)
    original = Trainer._loss
    calls = {"n": 0}

    def bad_grad_first(self, est, batch):
        calls["n"] += 1
        return original(self, _NanGrad.apply(est) if calls["n"] == 1 else est, batch)

    monkeypatch.setattr(Trainer, "_loss", bad_grad_first)
    before = weights(trainer.model)
    trainer.fit()
    after = weights(trainer.model)
    assert trainer.state.skipped_steps == 1 and trainer.state.step == 2
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the second step was taken


def test_accumulation_clips_once_per_optimizer_step(train_corpus, tmp_path, monkeypatch):
    cfg = make_train_config(train_corpus, "trainer.max_epochs=1", "optim.accum_steps=4", "optim.grad_clip=0.01")
    trainer = Trainer(cfg, tmp_path)
    norms_after_clip = []
    original = torch.nn.utils.clip_grad_norm_

    def counting_clip(params, max_norm, *args, **kwargs):
        params = list(params)
        total = original(params, max_norm, *args, **kwargs)
        norms_after_clip.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]))))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting_clip)
    trainer.fit()
    assert trainer.state.step == 2  # 8 micro-batches / 4
    assert len(norms_after_clip) == 2  # not 8: once per optimizer step, on the whole accumulated gradient
    assert all(n == pytest.approx(0.01, rel=1e-3) for n in norms_after_clip)


@pytest.mark.parametrize("decoupled", [False, True])
def test_weight_decay_is_applied(train_corpus, tmp_path, decoupled):
    results = {}
    for wd in (0.0, 0.5):
        cfg = make_train_config(train_corpus, f"optim.weight_decay={wd}", f"optim.decoupled_weight_decay={decoupled}",
                                "optim.lr=0.01")
        trainer = Trainer(cfg, tmp_path / f"wd{wd}")
        assert trainer.optimizer.param_groups[0]["weight_decay"] == wd
        assert isinstance(trainer.optimizer, torch.optim.AdamW) == decoupled  # (AdamW subclasses Adam)
        for p in trainer.model.parameters():
            p.grad = torch.zeros_like(p)  # only weight decay can move the weights
        before = weights(trainer.model)
        trainer._optimizer_step(False)
        results[wd] = (before, weights(trainer.model))
    assert_bitwise_equal(*results[0.0])
    before, after = results[0.5]
    w = "enc.conv1d.weight"
    assert float(after[w].abs().sum()) < float(before[w].abs().sum())  # shrunk toward zero
    # Zero gradients, first step, lr 0.01, wd 0.5. AdamW decays the weights directly: w * (1 - lr * wd). Adam adds
    # wd * w to the gradient, and its first step moves each weight by lr * g / (|g| + eps) = lr * sign(w).
    if decoupled:
        torch.testing.assert_close(after[w], before[w] * (1 - 0.01 * 0.5), rtol=1e-6, atol=0.0)
    else:
        big = 0.5 * before[w].abs() > 1e-5  # |g| >> eps
        assert big.float().mean() > 0.9
        torch.testing.assert_close(after[w][big], before[w][big] - 0.01 * before[w][big].sign(), rtol=1e-3, atol=1e-6)


def test_loss_clamp_db_caps_each_speakers_si_sdr_in_the_training_loss(train_corpus, tmp_path):
    plain = Trainer(make_train_config(train_corpus), tmp_path / "plain")
    batch = next(iter(plain.train_loader))
    torch.manual_seed(0)
    est = batch["sources"] + 1e-4 * torch.randn_like(batch["sources"])  # about 50 dB SI-SDR
    clamped = Trainer(make_train_config(train_corpus, "optim.loss_clamp_db=30"), tmp_path / "clamped",
                      loaders=(None, None))
    assert float(plain._loss(est, batch)) < -40.0
    assert float(clamped._loss(est, batch)) == pytest.approx(-30.0, abs=1e-4)
    plain.close()
    clamped.close()


def test_resume_false_starts_a_fresh_run_and_moves_the_previous_one_aside(train_corpus, tmp_path):
    exp = tmp_path / "exp"
    Trainer(make_train_config(train_corpus, "trainer.max_steps=1", "trainer.tensorboard=true"), exp).fit()
    resumed = Trainer(make_train_config(train_corpus), exp, loaders=(None, None))  # the default resumes
    assert resumed.state.step == 1
    resumed.close()
    old = {name: (exp / name).read_bytes() for name in ("last.pt", "train.log", "config.yaml")}

    fresh = Trainer(make_train_config(train_corpus, "trainer.resume=false"), exp, loaders=(None, None))
    fresh.close()
    assert fresh.state.step == 0 and fresh.state.epoch == 0 and not fresh.optimizer.state
    # the same seed, nothing to resume
    new = Trainer(make_train_config(train_corpus), tmp_path / "new", loaders=(None, None))
    new.close()
    assert_bitwise_equal(weights(new.model), weights(fresh.model))
    # The previous run is kept whole, in one folder that the warning names (also in the new train.log).
    [aside] = exp.glob("replaced-*")
    assert {name: (aside / name).read_bytes() for name in old} == old and any((aside / "tensorboard").iterdir())
    assert not (exp / "last.pt").exists() and not (exp / "tensorboard").exists()
    assert f"the previous run's files were moved to {aside}" in (exp / "train.log").read_text()
    text = (exp / "train.log").read_text()
    assert "trainer.resume=false" in text and "resumed" not in text


def test_plateau_halves_lr_and_early_stopping_keeps_best(train_corpus, tmp_path, monkeypatch):
    cfg = make_train_config(train_corpus, "trainer.max_epochs=10", "optim.plateau_patience=1",
                            "optim.early_stop_patience=3",
                            "data.dynamic_mixing.examples_per_epoch=4", "optim.accum_steps=1")
    trainer = Trainer(cfg, tmp_path)
    metrics = iter([1.0, 2.0, 1.5, 1.9, 1.0, 5.0])

    def fake_validate(self):
        return {"loss": 0.0, "si_sdr": 0.0, "si_sdri": next(metrics), "count": 1.0}

    monkeypatch.setattr(Trainer, "validate", fake_validate)
    state = trainer.fit()
    assert [h["valid_si_sdri"] for h in state.history] == [1.0, 2.0, 1.5, 1.9, 1.0]  # stopped after 3 bad
    assert state.best_metric == 2.0 and state.best_epoch == 1 and state.bad_epochs == 3
    lrs = [h["lr"] for h in state.history]
    assert lrs == [1e-3, 1e-3, 1e-3, 5e-4, 5e-4]  # halved after more than 1 bad epoch
    best = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == 1 and best["valid"]["valid_si_sdri"] == 2.0


def _record_linear_dtypes(trainer: Trainer) -> list[torch.dtype]:
    """Output dtypes of the first FLASH layer's hidden projection (an nn.Linear) in every forward pass."""
    linear = trainer.model.mask_net.mdl.intra_mdl.mossformerM.layers[0].to_hidden.mdl[1]
    assert isinstance(linear, torch.nn.Linear)
    dtypes: list[torch.dtype] = []
    linear.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    return dtypes


def test_bf16_autocast_and_activation_checkpointing(train_corpus, tmp_path, monkeypatch):
    from mossformer2.models import mossformer

    cfg = make_train_config(train_corpus, "trainer.max_steps=2", "trainer.precision=bf16", "model.dropout=0.0")
    bf16 = Trainer(cfg, tmp_path / "bf16")
    bf16_dtypes = _record_linear_dtypes(bf16)
    state = bf16.fit()
    assert state.skipped_steps == 0
    assert torch.bfloat16 in bf16_dtypes  # trainer.precision=bf16 really runs the layers under bf16 autocast
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # fp32 master weights
    plain = make_train_config(train_corpus, "trainer.max_steps=2", "model.dropout=0.0")
    ckpt = make_train_config(train_corpus, "trainer.max_steps=2", "model.dropout=0.0",
                             "trainer.activation_checkpointing=true")
    a, b = Trainer(plain, tmp_path / "plain"), Trainer(ckpt, tmp_path / "ckpt")
    fp32_dtypes = _record_linear_dtypes(a)
    assert b.model.mask_net.mdl.intra_mdl.mossformerM.activation_checkpointing
    calls = {"n": 0}
    original = mossformer.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(mossformer, "checkpoint", counting_checkpoint)
    a.fit()
    assert calls["n"] == 0
    assert fp32_dtypes and torch.bfloat16 not in fp32_dtypes
    b.fit()
    # 2 steps x 2 micro-batches, one (FLASH, FSMN) pair per layer: 2 checkpointed calls per training forward
    assert calls["n"] == 2 * 2 * 2 * cfg.model.num_mossformer_layer
    for k, v in weights(a.model).items():
        torch.testing.assert_close(v, weights(b.model)[k], atol=1e-6, rtol=1e-5)


def test_init_from_our_checkpoint(train_corpus, tmp_path):
    cfg = make_train_config(train_corpus)
    source = mossformer2.build_model(cfg.model)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)
    mossformer2.save_checkpoint(tmp_path / "pre.pt", source)
    trainer = Trainer(make_train_config(train_corpus, f"trainer.init_from={tmp_path / 'pre.pt'}"), tmp_path / "ft")
    assert_bitwise_equal(weights(source), weights(trainer.model))
    with pytest.raises(FileNotFoundError):
        Trainer(make_train_config(train_corpus, f"trainer.init_from={tmp_path / 'none.pt'}"), tmp_path / "ft2")


def test_init_from_the_official_checkpoint_format(train_corpus, tmp_path):
    """configs/finetune_official.yaml's path: the released file is {'model', 'optimizer', 'epoch', 'step'}
    (keys with 'module.' here, no config): its weights are taken, its optimizer state and counters are not."""
    cfg = make_train_config(train_corpus)
    source = mossformer2.build_model(cfg.model)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.25)
    optimizer = torch.optim.Adam(source.parameters(), lr=1e-4)
    source(0.1 * torch.randn(1, 800)).sum().backward()
    optimizer.step()
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()},
                "optimizer": optimizer.state_dict(), "epoch": 7, "step": 1234}, tmp_path / "official.pt")
    trainer = Trainer(make_train_config(train_corpus, f"trainer.init_from={tmp_path / 'official.pt'}"), tmp_path / "ft",
                      loaders=(None, None))
    trainer.close()
    assert_bitwise_equal(weights(source), weights(trainer.model))
    assert trainer.optimizer.state_dict()["state"] == {} and trainer.state.step == 0 and trainer.state.epoch == 0


def test_a_fine_tuned_model_keeps_the_separation_settings_its_base_recommends(train_corpus, tmp_path):
    """The built-in model recommends inference-time refinements ('separation'); a model fine-tuned from it lost
    them, so separating with it silently ran without. They go into best.pt and last.pt, and survive a resume."""
    cfg = make_train_config(train_corpus)
    mossformer2.save_checkpoint(tmp_path / "pre.pt", mossformer2.build_model(cfg.model),
                                extra={"separation": {"polarity_ensemble": True, "wiener_filter": False}})
    init = f"trainer.init_from={tmp_path / 'pre.pt'}"
    Trainer(make_train_config(train_corpus, init, "trainer.max_epochs=1"), tmp_path / "ft").fit()
    for name in ("best.pt", "last.pt"):
        saved = torch.load(tmp_path / "ft" / name, weights_only=True)
        assert saved["separation"] == {"polarity_ensemble": True, "wiener_filter": False}, name
    # resumes from last.pt
    Trainer(make_train_config(train_corpus, init, "trainer.max_epochs=2"), tmp_path / "ft").fit()
    assert torch.load(tmp_path / "ft" / "last.pt", weights_only=True)["separation"]["polarity_ensemble"] is True


def test_weight_average_follows_the_steps_and_is_what_gets_validated_and_saved(train_corpus, tmp_path, monkeypatch):
    """trainer.ema_decay: after each optimizer step avg <- avg + (1 - decay) * (weights - avg), starting from the
    weights of the first step; validation and best.pt use the average, last.pt keeps both."""
    decay = 0.75
    cfg = make_train_config(train_corpus, f"trainer.ema_decay={decay}", "trainer.max_epochs=1")
    steps: list[dict[str, torch.Tensor]] = []
    original = Trainer._optimizer_step

    def recording_step(self, bad):
        norm = original(self, bad)
        steps.append({k: v.detach().clone() for k, v in self.model.named_parameters()})
        return norm

    monkeypatch.setattr(Trainer, "_optimizer_step", recording_step)
    trainer = Trainer(cfg, tmp_path)
    validated = []
    original_validate = Trainer.validate

    def recording_validate(self):
        validated.append(weights(self.eval_model))
        return original_validate(self)

    monkeypatch.setattr(Trainer, "validate", recording_validate)
    trainer.fit()
    assert len(steps) == 4
    expected = dict(steps[0])
    for later in steps[1:]:
        expected = {k: expected[k] + (1 - decay) * (later[k] - expected[k]) for k in expected}
    averaged = dict(trainer.ema.module.named_parameters())
    for k, v in expected.items():
        torch.testing.assert_close(averaged[k], v, rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(averaged[k], trainer.model.state_dict()[k]) for k in expected)
    assert_bitwise_equal(validated[0], weights(trainer.ema.module))
    assert_bitwise_equal(weights(mossformer2.load_model(tmp_path / "best.pt")), weights(trainer.ema.module))
    last = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert_bitwise_equal(last["model"], weights(trainer.model))
    assert int(last["ema"]["n_averaged"]) == 4
    # A resumed run restores the average, also in the rebuilt trainer's validation
    resumed = Trainer(make_train_config(train_corpus, f"trainer.ema_decay={decay}", "trainer.max_epochs=2"), tmp_path)
    assert_bitwise_equal(weights(resumed.ema.module), weights(trainer.ema.module))
    resumed.close()
    with pytest.raises(ConfigError, match="ema_decay"):
        make_train_config(train_corpus, "trainer.ema_decay=1.0")


def test_killed_and_resumed_run_with_a_weight_average_equals_uninterrupted(train_corpus, tmp_path, monkeypatch):
    cfg = make_train_config(train_corpus, "trainer.ema_decay=0.9")
    reference = Trainer(cfg, tmp_path / "ref")
    reference.fit()
    resumed = killed_and_resumed(cfg, tmp_path / "run", monkeypatch, kill_at_call=7)
    resumed.fit()
    assert_bitwise_equal(weights(reference.ema.module), weights(resumed.ema.module))
    assert resumed.state.history == reference.state.history


def test_a_weight_average_starts_from_init_from_weights(train_corpus, tmp_path):
    source = mossformer2.build_model(make_train_config(train_corpus).model)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)
    mossformer2.save_checkpoint(tmp_path / "pre.pt", source)
    trainer = Trainer(make_train_config(train_corpus, f"trainer.init_from={tmp_path / 'pre.pt'}",
                                        "trainer.ema_decay=0.99"),
                      tmp_path / "ft")
    assert_bitwise_equal(weights(source), weights(trainer.eval_model))
    trainer.close()


def test_validation_si_sdri_is_the_improvement_over_the_mixture(train_corpus, tmp_path):
    """With 3 speakers the mixture's SI-SDR against each source is about -3 dB (with 2 it averages about 0 over
    the speakers, which hid a validation that reported SI-SDR as SI-SDRi). A "separator" that returns the
    mixture for every speaker improves nothing: SI-SDRi 0, SI-SDR well below 0."""
    from mossformer2 import losses

    # The module corpus's training folder holds 3 speakers: enough for 3-speaker validation mixtures.
    cfg = make_train_config(train_corpus, "model.num_spks=3",
                            f"data.dynamic_mixing.valid_utterances={train_corpus.train_utterances}",
                            "data.dynamic_mixing.valid_examples=4")
    trainer = Trainer(cfg, tmp_path)
    trainer.eval_model.forward = lambda mix, lengths=None: mix[:, None, :].expand(-1, 3, -1).clone()
    result = trainer.validate()
    assert result["count"] == 4
    assert abs(result["si_sdri"]) < 1e-3 and result["si_sdr"] < -1.0, result
    # The real (untrained) network, checked against SI-SDRi recomputed from mossformer2.losses
    del trainer.eval_model.forward
    result = trainer.validate()
    expected, count = 0.0, 0
    with torch.no_grad():
        for batch in trainer.valid_loader:
            mix, ref, lengths = batch["mix"], batch["sources"], batch["lengths"]
            est = trainer.eval_model(mix, lengths)
            perm = losses.best_permutation(losses.pairwise_si_sdr(est, ref, lengths))  # est i -> ref perm[i]
            matched = torch.stack([est[b, perm[b].argsort()] for b in range(len(est))])  # reordered like ref
            improvement = losses.si_sdr(matched, ref, lengths) - losses.si_sdr(mix[:, None].expand_as(ref), ref,
                                                                                lengths)
            expected += float(improvement.mean(-1).sum())
            count += len(mix)
    assert count == 4 and result["si_sdri"] == pytest.approx(expected / count, abs=1e-4)
    assert result["loss"] == pytest.approx(-result["si_sdr"])  # optim.loss_clamp_db unset: the loss is -SI-SDR
    assert abs(result["si_sdri"] - result["si_sdr"]) > 1.0  # the two differ here, so the check above means something
    trainer.close()


def test_validation_scores_do_not_depend_on_the_batch_size(train_corpus, tmp_path):
    """Full-utterance validation batches are zero-padded; the model gets their lengths, so scores match
    one-utterance batches."""
    scores = []
    for size in (1, 4):
        cfg = make_train_config(train_corpus, f"data.valid_batch_size={size}", "data.dynamic_mixing.valid_examples=6",
                                "data.dynamic_mixing.valid_max_seconds=0.5")
        trainer = Trainer(cfg, tmp_path / f"b{size}")
        if size > 1:  # the test only means something when a batch is padded
            assert any(bool((b["lengths"] < b["mix"].shape[-1]).any()) for b in trainer.valid_loader)
        scores.append(trainer.validate())
    assert scores[0]["count"] == scores[1]["count"] == 6
    for key in ("loss", "si_sdr", "si_sdri"):
        assert math.isclose(scores[0][key], scores[1][key], rel_tol=1e-4, abs_tol=1e-4), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none; run on a GPU machine)")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_cuda_run_trains_validates_and_resumes_on_cpu(train_corpus, tmp_path, precision):
    """Validation once summed CPU and CUDA tensors together; a GPU state must also resume on a CPU."""
    cfg = make_train_config(train_corpus, "trainer.device=cuda", f"trainer.precision={precision}",
                            "trainer.max_epochs=1")
    state = Trainer(cfg, tmp_path).fit()
    assert len(state.history) == 1 and math.isfinite(state.history[0]["valid_si_sdri"])
    on_cpu = Trainer(make_train_config(train_corpus, "trainer.max_epochs=2"), tmp_path)
    assert on_cpu.state.epoch == 1 and next(on_cpu.model.parameters()).device.type == "cpu"
    on_cpu.close()


def test_cli_run_stopped_before_any_validation_says_so(train_corpus, tmp_path, capsys):
    from mossformer2.cli import main
    from mossformer2.training.config import save_train_config

    save_train_config(make_train_config(train_corpus), tmp_path / "tiny.yaml")
    assert main(["train", "--config", str(tmp_path / "tiny.yaml"), "--exp-dir", str(tmp_path / "exp"),
                 "trainer.max_steps=1"]) == 0
    out = capsys.readouterr().out
    assert "no validation yet" in out and "-inf" not in out
    # A limited run does not read like a finished one: which limit, and how to go on.
    assert out.startswith("stopped: trainer.max_steps (1) reached at step 1 (mid-epoch 0)") and "done" not in out
    assert "raise trainer.max_steps (or set it to null) and run again to continue" in out
    assert "-inf" not in (tmp_path / "exp" / "train.log").read_text()


def test_log_lines_are_not_glued_onto_the_progress_bar(train_corpus, tmp_path, capsys):
    import logging
    import re
    import sys

    console = logging.StreamHandler(sys.stderr)  # what `mossformer2 train` has: a console handler on the root
    logging.getLogger().addHandler(console)
    try:
        Trainer(make_train_config(train_corpus, "trainer.max_steps=3", "trainer.progress_bar=true"), tmp_path).fit()
    finally:
        logging.getLogger().removeHandler(console)
    err = capsys.readouterr().err
    starts = [m.start() for m in re.finditer(r"epoch 0 step \d: loss", err)]
    assert len(starts) == 3 and "batch" in err  # the bar was drawn
    assert all(err[i - 1] in "\r\n" for i in starts), err  # each log line starts a fresh line


def test_progress_is_logged_by_rank_0_only(train_corpus, tmp_path):
    import logging

    from mossformer2.distributed import DistInfo
    from mossformer2.training.trainer import log

    parent = logging.getLogger("mossformer2")
    levels = log.level, parent.level
    parent.setLevel(logging.INFO)  # as `mossformer2 train` sets it, on every rank
    log.setLevel(logging.NOTSET)
    try:
        Trainer(make_train_config(train_corpus), tmp_path / "rank1", loaders=(None, None), dist_info=DistInfo(rank=1))
        assert not log.isEnabledFor(logging.INFO) and log.isEnabledFor(logging.WARNING)
        Trainer(make_train_config(train_corpus), tmp_path / "rank0")
        assert log.isEnabledFor(logging.INFO)
    finally:
        log.setLevel(levels[0])
        parent.setLevel(levels[1])


def test_resume_with_another_model_config_names_only_the_keys_that_differ(train_corpus, tmp_path):
    first = Trainer(make_train_config(train_corpus), tmp_path, loaders=(None, None))
    first.save_checkpoint(tmp_path / "last.pt")
    first.close()
    other = make_train_config(train_corpus, "model.num_mossformer_layer=2", "model.dropout=0.0")
    with pytest.raises(ValueError, match="model config") as err:
        Trainer(other, tmp_path, loaders=(None, None))
    message = str(err.value)
    assert "model.num_mossformer_layer: 1 in the checkpoint, 2 in the config" in message
    assert "model.dropout: 0.1 in the checkpoint, 0.0 in the config" in message
    assert "encoder_embedding_dim" not in message and "sample_rate" not in message  # unchanged keys: not listed


def test_a_closed_trainer_refuses_a_second_fit(train_corpus, tmp_path):
    """fit() closes the Trainer (lock, train.log, TensorBoard): a second fit() trained with none of them."""
    trainer = Trainer(make_train_config(train_corpus, "trainer.max_epochs=1",
                                        "data.dynamic_mixing.examples_per_epoch=4",
                                        "optim.accum_steps=1"), tmp_path / "exp")
    trainer.fit()
    with pytest.raises(RuntimeError, match="this Trainer is closed .* make a new Trainer"):
        trainer.fit()


def test_resume_checks_the_saved_separation_settings(train_corpus, tmp_path):
    first = Trainer(make_train_config(train_corpus), tmp_path, loaders=(None, None))
    first.save_checkpoint(tmp_path / "last.pt")
    first.close()
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    ckpt["separation"] = {"wiener_filter": "yes"}
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"last\.pt: separation settings \['wiener_filter'\] must be true or false"):
        Trainer(make_train_config(train_corpus), tmp_path, loaders=(None, None))


def test_a_rank_the_saved_run_lacked_gets_a_random_stream_of_its_own():
    """Resumed on more processes than saved it, the new ranks took rank 0's RNG state: the same dropout masks."""
    from mossformer2.training.checkpointing import restore_rng_state, rng_state

    torch.manual_seed(11)
    saved = [rng_state()]  # a one-process run
    draws = {}
    for rank in (0, 1, 2):
        restore_rng_state(saved, rank, seed=3, step=40)
        draws[rank] = torch.rand(4)
    torch.set_rng_state(saved[0]["torch"])
    assert torch.equal(draws[0], torch.rand(4))  # the saved rank continues its own stream
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[1])


def test_cpu_threads_sets_torchs_intra_op_threads(train_corpus, tmp_path):
    threads = torch.get_num_threads()
    try:
        Trainer(make_train_config(train_corpus, "trainer.cpu_threads=3"), tmp_path, loaders=(None, None)).close()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_a_checkpoint_from_another_version_resumes(train_corpus, tmp_path, caplog):
    """A model option added since a checkpoint was saved (absent from it, default in the config) is the same
    network, and a newer version's extra counter is dropped with a warning: both resumed (a raw dict comparison
    refused the first, ``TrainState(**saved)`` raised a TypeError on the second)."""
    import logging

    first = Trainer(make_train_config(train_corpus), tmp_path, loaders=(None, None))
    first.state.step = 7
    first.save_checkpoint(tmp_path / "last.pt")
    first.close()
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    del ckpt["config"]["conv_kernel_size"]  # saved before the option existed; the config has its default
    ckpt["trainer_state"]["tokens_seen"] = 123  # a counter from a newer version
    torch.save(ckpt, tmp_path / "last.pt")
    with caplog.at_level(logging.WARNING, logger="mossformer2.training"):
        resumed = Trainer(make_train_config(train_corpus), tmp_path, loaders=(None, None))
    resumed.close()
    assert resumed.state.step == 7
    assert "training counters this version does not know (tokens_seen)" in caplog.text
    # An option that differs from the default the checkpoint implies is still a different network.
    with pytest.raises(ValueError, match="model.conv_kernel_size: 17 in the checkpoint, 9 in the config"):
        Trainer(make_train_config(train_corpus, "model.conv_kernel_size=9"), tmp_path, loaders=(None, None))


def test_files_dropped_while_the_cache_loads_are_counted_as_skipped(train_corpus, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF garbage, not audio")
    extra = tmp_path / "extra.txt"
    extra.write_text(f"{bad} spk_bad\n")
    cfg = make_train_config(train_corpus, "data.skip_bad_files=true", "data.dynamic_mixing.examples_per_epoch=4",
                            "optim.accum_steps=1", "trainer.max_epochs=1", "trainer.checkpoint_every_steps=null")
    cfg.data.dynamic_mixing.train_utterances = [train_corpus.train_utterances, str(extra)]
    trainer = Trainer(cfg, tmp_path / "exp")
    assert trainer.preload_skipped == 1
    trainer.fit()
    assert "0 skipped steps, 1 skipped file reads" in (tmp_path / "exp" / "train.log").read_text()


def test_resume_applies_changed_optimizer_settings_and_ignores_init_from(train_corpus, tmp_path, caplog):
    import logging

    from mossformer2.training.config import load_train_config

    first = Trainer(make_train_config(train_corpus), tmp_path, loaders=(None, None))
    first.optimizer.param_groups[0]["lr"] = 2.5e-4  # as if the plateau schedule had halved it twice
    first.save_checkpoint(tmp_path / "last.pt")
    first.close()
    same = Trainer(make_train_config(train_corpus), tmp_path, loaders=(None, None))
    assert same.lr == 2.5e-4  # optim.lr unchanged: the schedule's lr goes on
    same.close()
    changed = make_train_config(train_corpus, "optim.lr=0.5", "optim.betas=[0.8,0.9]", "optim.eps=1e-6",
                                "optim.weight_decay=0.1",
                                "optim.plateau_factor=0.1", "optim.plateau_patience=0", "optim.min_lr=1e-5",
                                f"trainer.init_from={tmp_path / 'none.pt'}")
    with caplog.at_level(logging.WARNING, logger="mossformer2.training"):
        resumed = Trainer(changed, tmp_path, loaders=(None, None))
    group = resumed.optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.5, (0.8, 0.9), 1e-6, 0.1)
    assert (resumed.scheduler.factor, resumed.scheduler.patience, resumed.scheduler.min_lrs) == (0.1, 0, [1e-5])
    assert "optim.lr 0.001 -> 0.5" in caplog.text and "(the lr was 0.00025)" in caplog.text
    assert f"trainer.init_from {tmp_path / 'none.pt'} is ignored" in caplog.text
    resumed.close()
    # config.yaml tells what runs: the new optimizer settings, and no init_from (this run never used one)
    written = load_train_config(tmp_path / "config.yaml")
    assert written.optim == changed.optim and written.trainer.init_from is None


def test_more_accumulation_steps_than_an_epoch_has_batches_fail_before_any_file_is_written(train_corpus, tmp_path):
    with pytest.raises(ValueError, match=r"^one epoch has 8 batch\(es\), fewer than optim.accum_steps \(9\)"):
        Trainer(make_train_config(train_corpus, "optim.accum_steps=9", "trainer.tensorboard=true"), tmp_path / "acc")
    assert not (tmp_path / "acc").exists()


def test_resume_names_changed_data_settings_and_what_they_break(train_corpus, tmp_path, caplog):
    """data.* changes apply on resume like optim.* ones, with a warning naming them; and where they make the
    epoch position or the best score so far mean something else, a warning says that too."""
    import logging

    def resume(*overrides: str) -> str:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mossformer2.training"):
            Trainer(make_train_config(train_corpus, *overrides), tmp_path).close()
        return caplog.text

    Trainer(make_train_config(train_corpus, "trainer.max_epochs=1"), tmp_path).fit()  # a best score, at epoch 0
    assert "changed data settings" not in resume("trainer.max_epochs=2")
    text = resume("data.dynamic_mixing.valid_examples=3")
    assert "changed data settings: data.dynamic_mixing.valid_examples 2 -> 3" in text
    assert "the best score so far" in text and "was measured on the earlier set" in text
    assert "the best score" not in resume("data.segment_seconds=0.25")  # training crops only
    assert "the best score" not in resume("data.skip_bad_files=true")  # changes neither
    assert "the best score so far" in resume("data.dynamic_mixing.gain_db=[-1,1]")  # validation mixes so too
    text = resume("trainer.seed=4")  # draws the (validation) mixtures too
    assert "changed data settings: trainer.seed 3 -> 4" in text and "the best score so far" in text
    # mid-epoch: 4 of the epoch's 8 batches used
    Trainer(make_train_config(train_corpus, "trainer.max_steps=6"), tmp_path).fit()
    text = resume("data.segment_seconds=0.25", "trainer.max_steps=8")
    assert "data.segment_seconds 0.2 -> 0.25" in text and "goes on after its first 4 batches" in text
    text = resume("data.batch_size=4", "trainer.max_steps=8")  # the position is converted, not lost
    assert "data.batch_size 2 -> 4" in text and "goes on after" not in text and "another data layout" in text
    # and the optimizer steps now average twice the examples, at the same learning rate: said too
    assert "1 process(es) x batch 2 x optim.accum_steps 2 -> 1 x 4 x 2, 4 -> 8 examples per optimizer step" in text
    # the same effective batch by other means (twice the batch, half the accumulation): nothing to say
    Trainer(make_train_config(train_corpus, "trainer.max_steps=6"), tmp_path / "same").fit()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mossformer2.training"):
        Trainer(make_train_config(train_corpus, "data.batch_size=4", "optim.accum_steps=1", "trainer.max_steps=8"),
                tmp_path / "same").close()
    assert "another effective batch" not in caplog.text
    text = resume("data.dynamic_mixing.examples_per_epoch=6", "trainer.max_steps=8")  # 3 batches an epoch now
    assert "epoch 1 had used 4 batches, and has 2 with these settings: it ends without further steps" in text


def test_with_a_premixed_validation_set_mixing_settings_leave_the_best_score_alone(train_corpus, tmp_path, caplog):
    import logging

    from tests.data.test_datasets import _make_wsj_folder

    folder = _make_wsj_folder(tmp_path / "cv", [2000, 2000])
    premixed = ("data.dynamic_mixing.valid_utterances=null", f"data.valid={folder}")
    Trainer(make_train_config(train_corpus, *premixed, "trainer.max_epochs=1"), tmp_path / "exp").fit()
    with caplog.at_level(logging.WARNING, logger="mossformer2.training"):
        Trainer(make_train_config(train_corpus, *premixed, "data.dynamic_mixing.gain_db=[-1,1]"),
                tmp_path / "exp").close()
    assert "data.dynamic_mixing.gain_db [-2.5, 2.5] -> [-1.0, 1.0]" in caplog.text
    assert "the best score" not in caplog.text
    # uncropped, a pre-mixed set does not depend on the seed either (it was said to "may have changed")
    for crop, changed in (("data.max_valid_seconds=null", False), ("data.max_valid_seconds=0.1", True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mossformer2.training"):
            Trainer(make_train_config(train_corpus, *premixed, "trainer.seed=4", crop), tmp_path / "exp").close()
        assert "trainer.seed 3 -> 4" in caplog.text and ("the best score" in caplog.text) == changed


def test_a_finished_run_stays_finished(train_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "validate", lambda self: {"loss": 0.0, "si_sdr": 0.0, "si_sdri": 1.0, "count": 1.0})
    cfg = make_train_config(train_corpus, "trainer.max_epochs=10", "optim.early_stop_patience=2", "optim.accum_steps=1",
                            "data.dynamic_mixing.examples_per_epoch=4")
    first = Trainer(cfg, tmp_path).fit()
    assert first.epoch == 3 and first.bad_epochs == 2  # epoch 0 is the best, 1 and 2 are not
    again = Trainer(cfg, tmp_path).fit()  # the same command again: nothing more to train
    assert (again.epoch, again.step, again.history) == (3, first.step, first.history)
    log = (tmp_path / "train.log").read_text()
    assert "already finished (epoch 3 of 10; stopped early after 2 epochs without improvement)" in log
    Trainer(make_train_config(train_corpus, "trainer.max_epochs=3", "optim.early_stop_patience=null",
                              "optim.accum_steps=1",
                              "data.dynamic_mixing.examples_per_epoch=4"), tmp_path).fit()
    assert "already finished (epoch 3 of 3)\n" in (tmp_path / "train.log").read_text()


def test_a_validation_utterance_shorter_than_the_network_minimum_is_zero_padded(train_corpus, tmp_path, monkeypatch):
    """A 10-sample utterance (the network needs 24) is zero-padded for the network and scored on its own 10
    samples: the same alone in its batch (padded to 24) as beside a longer one (padded to 2000, the model told
    its length), and as losses.si_sdr scores the unpadded item."""
    import soundfile as sf

    from mossformer2 import losses
    from mossformer2.training import trainer as trainer_module
    from tests.data.test_datasets import _make_wsj_folder

    folder = _make_wsj_folder(tmp_path / "cv", [10, 2000])
    scored = []  # -SI-SDR [B] of each validation batch, in the validation set's order
    original = trainer_module.pit_si_sdr_loss

    def recording_loss(est, ref, lengths=None, clamp_db=None, reduction="mean"):
        loss, perm = original(est, ref, lengths, clamp_db, reduction)
        scored.append(loss)
        return loss, perm

    monkeypatch.setattr(trainer_module, "pit_si_sdr_loss", recording_loss)
    short_si_sdr = {}
    for batch_size in (1, 2):
        cfg = make_train_config(train_corpus, "data.dynamic_mixing.valid_utterances=null", f"data.valid={folder}",
                                f"data.valid_batch_size={batch_size}")
        trainer = Trainer(cfg, tmp_path / f"exp{batch_size}")
        assert trainer.model.min_input_length == 24
        scored.clear()
        result = trainer.validate()
        trainer.close()
        assert result["count"] == 2 and all(math.isfinite(result[k]) for k in ("loss", "si_sdr", "si_sdri"))
        assert [i for batch in trainer.valid_loader for i in batch["ids"]] == ["u0", "u1"]  # u0: 10 samples
        short_si_sdr[batch_size] = -float(torch.cat(scored)[0])
    # The same (untrained) network on the item alone, zero-padded to 24, scored on its own 10 samples
    def read(name: str) -> torch.Tensor:
        return torch.from_numpy(sf.read(folder / name / "u0.wav", dtype="float32")[0])

    mix, ref = read("mix")[None], torch.stack([read("s1"), read("s2")])[None]  # [1, 10], [1, 2, 10]
    with torch.no_grad():
        est = trainer.eval_model(torch.nn.functional.pad(mix, (0, 14)))[..., :10]
    expected = max(float(losses.si_sdr(est[:, list(order)], ref).mean()) for order in ((0, 1), (1, 0)))
    assert short_si_sdr[1] == pytest.approx(expected, abs=1e-4)
    assert short_si_sdr[2] == pytest.approx(expected, abs=1e-3)


def test_nan_validation_and_an_epoch_of_skipped_steps_are_reported_as_such(train_corpus, tmp_path, monkeypatch):
    from mossformer2.training.trainer import best_summary

    nan = float("nan")
    monkeypatch.setattr(Trainer, "_loss", lambda self, est, batch: est.float().sum() * nan)
    monkeypatch.setattr(Trainer, "validate", lambda self: {"loss": nan, "si_sdr": nan, "si_sdri": nan, "count": 1.0})
    cfg = make_train_config(train_corpus, "trainer.max_epochs=1", "optim.accum_steps=1",
                            "data.dynamic_mixing.examples_per_epoch=4")
    state = Trainer(cfg, tmp_path).fit()
    assert state.skipped_steps == 2 and math.isnan(state.history[0]["train_loss"])  # not 0.0
    assert best_summary(state) == "validation SI-SDRi was NaN in all 1 validated epochs (the model diverged?)"
    log = (tmp_path / "train.log").read_text()
    assert "train loss nan" in log and "(no best yet)" in log and "-inf" not in log
    assert "validation SI-SDRi is nan (the model diverged?)" in log
    assert "epoch 0: every training step was skipped" in log
    # With a finite validation (skipped steps leave the weights as they were) the skipped epoch is still reported.
    monkeypatch.setattr(Trainer, "validate", lambda self: {"loss": -1.0, "si_sdr": 1.0, "si_sdri": 1.0, "count": 1.0})
    Trainer(cfg, tmp_path / "finite").fit()
    log = (tmp_path / "finite" / "train.log").read_text()
    assert "epoch 0: every training step was skipped" in log and "diverged" not in log


def test_init_from_another_architecture_names_the_config_keys_that_differ(train_corpus, tmp_path):
    pre = tmp_path / "pre.pt"
    mossformer2.save_checkpoint(pre, mossformer2.build_model(make_train_config(train_corpus).model))
    with pytest.raises(ValueError) as err:
        Trainer(make_train_config(train_corpus, f"trainer.init_from={pre}", "model.num_mossformer_layer=2"),
                tmp_path / "ft")
    message = str(err.value)
    assert message.startswith(f"trainer.init_from {pre}: the checkpoint's model config differs")
    assert "model.num_mossformer_layer: 1 in the checkpoint, 2 in the config" in message
    assert "missing keys" not in message and "encoder_embedding_dim" not in message
    with pytest.raises(FileNotFoundError, match=f"^trainer.init_from {tmp_path / 'none.pt'}: "):
        Trainer(make_train_config(train_corpus, f"trainer.init_from={tmp_path / 'none.pt'}"), tmp_path / "ft2")


def test_a_missing_data_path_names_its_key_before_the_experiment_folder_is_made(train_corpus, tmp_path):
    for overrides, key in (([f"data.valid={tmp_path / 'nope'}", "data.dynamic_mixing.valid_utterances=null"],
                            "data.valid: manifest not found"),
                           ([f"data.dynamic_mixing.train_utterances={tmp_path / 'nope'}"],
                            "data.dynamic_mixing.train_utterances: utterance list or folder not found")):
        with pytest.raises(FileNotFoundError, match=f"^{key}"):
            Trainer(make_train_config(train_corpus, *overrides), tmp_path / "exp")
        assert not (tmp_path / "exp").exists()


def test_fp16_loss_scaling_scales_the_loss_before_backward(train_corpus, tmp_path):
    """fp16 (CUDA only) steps through a GradScaler; a CPU GradScaler stands in for it here. Its unscale_ once
    failed at the first step ("did not use scaler.scale(loss)"); a power-of-2 scale must not change the steps."""
    cfg = make_train_config(train_corpus, "trainer.max_steps=2", "model.dropout=0.0")
    plain = Trainer(cfg, tmp_path / "plain")
    plain.fit()
    scaled = Trainer(cfg, tmp_path / "scaled")
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state = scaled.fit()
    assert state.skipped_steps == 0
    for key, value in weights(plain.model).items():
        torch.testing.assert_close(weights(scaled.model)[key], value)


@pytest.mark.parametrize("bad_call", [1, 3])
def test_fp16_skips_a_step_without_backward_nan_loss_or_empty_batch(train_corpus, tmp_path, monkeypatch, bad_call):
    """fp16's GradScaler refuses to unscale, step or update without a scaled backward in the step: a NaN loss
    (the overflow the skip exists for) or an all-unreadable batch, one micro-batch per step, once stopped the run
    with an AssertionError. The step is skipped (NaN) or empty, and training goes on. A CPU GradScaler stands in."""
    cfg = make_train_config(train_corpus, "trainer.max_steps=4", "optim.accum_steps=1")
    calls = {"_loss": 0, "_micro_step": 0}

    def on_bad_call(name, change):
        """Trainer.<name> with its arguments (or, for _loss, its result) changed by ``change`` on call bad_call."""
        original = getattr(Trainer, name)

        def wrapped(self, *args):
            calls[name] += 1
            if calls[name] != bad_call:
                return original(self, *args)
            return change(original(self, *args)) if name == "_loss" else original(self, *change(*args))

        monkeypatch.setattr(Trainer, name, wrapped)

    trainer = Trainer(cfg, tmp_path / "nan")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    on_bad_call("_loss", lambda loss: loss * float("nan"))
    state = trainer.fit()
    assert state.step == 4 and state.skipped_steps == 1
    monkeypatch.undo()

    trainer = Trainer(cfg, tmp_path / "empty")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    # every file of this batch was unreadable (data.skip_bad_files)
    on_bad_call("_micro_step", lambda batch, last: ({**batch, "mix": batch["mix"][:0],
                                                     "sources": batch["sources"][:0],
                                                     "lengths": batch["lengths"][:0]}, last))
    before = None

    def record(self, bad):
        nonlocal before
        if calls["_micro_step"] == bad_call:
            before = weights(self.model)
        result = original_step(self, bad)
        if calls["_micro_step"] == bad_call:
            assert_bitwise_equal(before, weights(self.model))  # nothing to learn from an empty batch
        return result

    original_step = Trainer._optimizer_step
    monkeypatch.setattr(Trainer, "_optimizer_step", record)
    state = trainer.fit()
    assert state.step == 4 and state.skipped_steps == 0 and before is not None


def _signal_at_step(monkeypatch, step: int, signum: int, repeats: int = 1) -> None:
    """Send ``signum`` to this process from inside the ``step``-th optimizer step (as Ctrl-C or a preemption would
    arrive in the middle of one)."""
    import os

    calls = {"n": 0}
    original = Trainer._optimizer_step

    def signalled_step(self, bad):
        calls["n"] += 1
        if calls["n"] == step:
            for _ in range(repeats):
                os.kill(os.getpid(), signum)
        return original(self, bad)

    monkeypatch.setattr(Trainer, "_optimizer_step", signalled_step)


def test_sigint_mid_epoch_saves_the_finished_step_and_the_resumed_run_equals_uninterrupted(train_corpus, tmp_path,
                                                                                          monkeypatch):
    import signal

    from mossformer2.training.experiment import TrainingInterrupted

    cfg = make_train_config(train_corpus,
                            "trainer.checkpoint_every_steps=null")  # only the interruption saves mid-epoch
    reference = Trainer(cfg, tmp_path / "ref")
    reference.fit()
    before = signal.getsignal(signal.SIGINT)
    _signal_at_step(monkeypatch, 5, signal.SIGINT, repeats=2)  # torchrun repeats the terminal's Ctrl-C at once
    with pytest.raises(KeyboardInterrupt) as stop:
        Trainer(cfg, tmp_path / "run").fit()
    assert isinstance(stop.value, TrainingInterrupted) and stop.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # the handler is only fit()'s
    last = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert last["step"] == 5 and last["trainer_state"]["batches_done"] == 2  # step 5 finished: epoch 1, 2 batches
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"interrupted by SIGINT at step 5 (mid-epoch 1): state saved to {tmp_path / 'run' / 'last.pt'}" in log
    monkeypatch.undo()
    resumed = Trainer(cfg, tmp_path / "run")
    resumed.fit()
    assert resumed.state.step == 8 and resumed.state.history == reference.state.history
    assert_bitwise_equal(weights(reference.model), weights(resumed.model))


def test_sigterm_makes_the_cli_save_and_exit_with_143(train_corpus, tmp_path, monkeypatch):
    import signal

    from mossformer2.cli import main
    from mossformer2.training.config import save_train_config

    class Terminated(Exception):
        pass

    def terminated(signum, frame):  # stands in for the default action, which would end the test process
        raise Terminated

    save_train_config(make_train_config(train_corpus, "trainer.checkpoint_every_steps=null"), tmp_path / "c.yaml")
    _signal_at_step(monkeypatch, 2, signal.SIGTERM)
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        assert main(["train", "--config", str(tmp_path / "c.yaml"), "--exp-dir", str(tmp_path / "exp")]) == 143
        assert signal.getsignal(signal.SIGTERM) is terminated  # restored after fit()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert torch.load(tmp_path / "exp" / "last.pt", map_location="cpu", weights_only=True)["step"] == 2
    log = (tmp_path / "exp" / "train.log").read_text()
    assert "interrupted by SIGTERM at step 2 (mid-epoch 0): state saved to" in log


def test_a_second_sigint_while_saving_aborts_at_once_and_keeps_the_previous_last_pt(train_corpus, tmp_path,
                                                                                    monkeypatch):
    import os
    import signal

    from mossformer2.training import experiment  # stop_signals times the second signal (time.monotonic)
    from mossformer2.training.experiment import TrainingInterrupted

    cfg = make_train_config(train_corpus, "trainer.checkpoint_every_steps=2")
    clock = {"now": 0.0}
    monkeypatch.setattr(experiment.time, "monotonic", lambda: clock["now"])
    original_save = Trainer.save_checkpoint

    def save_then_ctrl_c_again(self, path):
        if self.state.step == 3:  # the save of the interruption: the user presses Ctrl-C again, 10 s later
            clock["now"] += 10.0
            os.kill(os.getpid(), signal.SIGINT)
        original_save(self, path)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_ctrl_c_again)
    _signal_at_step(monkeypatch, 3, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as stop:
        Trainer(cfg, tmp_path).fit()
    assert not isinstance(stop.value, TrainingInterrupted)  # aborted, not the orderly stop
    assert torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)["step"] == 2  # untouched
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_resumed_run_does_not_log_the_interrupted_runs_later_steps_twice(train_corpus, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_train_config(train_corpus, "trainer.tensorboard=true", "trainer.checkpoint_every_steps=2")
    resumed = killed_and_resumed(cfg, tmp_path, monkeypatch, kill_at_call=4)  # logged 1-3, last.pt at step 2
    assert resumed.state.step == 2
    resumed.fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))  # not 1, 2, 3, 3, 4, ...


def test_a_second_run_in_the_same_experiment_folder_fails_at_once(train_corpus, tmp_path, monkeypatch):
    import os

    from mossformer2.training import trainer as trainer_module
    from mossformer2.training.experiment import ExperimentInUseError

    first = Trainer(make_train_config(train_corpus), tmp_path, loaders=(None, None))
    monkeypatch.setattr(trainer_module, "create_dataloaders", lambda *a: pytest.fail("the data was read"))
    with pytest.raises(ExperimentInUseError, match=rf"^another training run \(pid {os.getpid()}\) is using {tmp_path}"):
        Trainer(make_train_config(train_corpus), tmp_path)
    assert "another" not in (tmp_path / "train.log").read_text()  # the first run's files are untouched
    first.close()  # the lock goes with the run
    Trainer(make_train_config(train_corpus), tmp_path, loaders=(None, None)).close()


def test_mid_epoch_resume_with_another_layout_continues_after_the_examples_used(train_corpus, tmp_path, caplog):
    import logging

    Trainer(make_train_config(train_corpus, "optim.accum_steps=1", "trainer.max_steps=3"),
            tmp_path).fit()  # 3 batches of 2
    last = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert (last["trainer_state"]["world_size"], last["trainer_state"]["batch_size"]) == (1, 2)

    def resumed_batches(*overrides: str, **saved) -> int:
        ckpt = dict(last, trainer_state={**last["trainer_state"], **saved})
        for key in [k for k, v in saved.items() if v is None]:
            del ckpt["trainer_state"][key]
        torch.save(ckpt, tmp_path / "last.pt")
        trainer = Trainer(make_train_config(train_corpus, "optim.accum_steps=1", *overrides), tmp_path,
                          loaders=(None, None))
        trainer.close()
        return trainer.state.batches_done

    with caplog.at_level(logging.WARNING, logger="mossformer2.training"):
        assert resumed_batches() == 3  # the same layout: exact, no warning
        assert "not exact" not in caplog.text
        assert resumed_batches("data.batch_size=4") == 1  # 6 examples used: one batch of 4, then on
        assert "(1 process(es) x batch 2 -> 1 x 4, optim.accum_steps 1): continuing after 4 of the 6" in caplog.text
        assert "the rest of this epoch is not exact" in caplog.text
        assert resumed_batches(world_size=2) == 6  # two processes had used 12 examples
        assert resumed_batches("optim.accum_steps=2") == 2  # whole optimizer steps
        caplog.clear()
        assert resumed_batches(world_size=None, batch_size=None) == 3  # an older checkpoint: as before
        assert resumed_batches(world_size=4, batches_done=0) == 0  # at an epoch boundary: nothing to convert
        assert "not exact" not in caplog.text


def test_a_diverged_run_stops_and_keeps_the_last_finite_checkpoint(train_corpus, tmp_path, monkeypatch):
    from mossformer2.training.trainer import TrainingDivergedError

    calls = {"n": 0}
    original = Trainer._loss

    def nan_from_step_3(self, est, batch):
        calls["n"] += 1
        return original(self, est, batch) * (float("nan") if calls["n"] > 2 else 1.0)

    monkeypatch.setattr(Trainer, "_loss", nan_from_step_3)
    cfg = make_train_config(train_corpus, "optim.accum_steps=1", "trainer.checkpoint_every_steps=1",
                            "trainer.max_nonfinite_steps=3")
    with pytest.raises(TrainingDivergedError, match=r"^the model diverged: 3 optimizer steps in a row \(steps 3-5\) "
                                                    rf"had a NaN/inf loss.*; {tmp_path / 'last.pt'} keeps step 2"):
        Trainer(cfg, tmp_path).fit()
    assert torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)["step"] == 2
    log = (tmp_path / "train.log").read_text()
    assert "ERROR the model diverged" in log and "run again to resume from there" in log
    calls["n"] = -10**6  # NaN from the first step: nothing to resume from, and the message says so
    monkeypatch.setattr(Trainer, "_loss", lambda self, est, batch: original(self, est, batch) * float("nan"))
    with pytest.raises(TrainingDivergedError, match=r"no last.pt was written\. Lower optim.lr \(or set "
                                                    r"optim.grad_clip\) and run again \(it starts afresh\)$"):
        Trainer(cfg, tmp_path / "fresh").fit()


def test_a_step_skipped_for_its_gradient_logs_no_gradient_norm(train_corpus, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = torch.nn.utils.clip_grad_norm_

    def inf_at_step_2(parameters, max_norm):
        calls["n"] += 1
        norm = original(parameters, max_norm)
        return torch.full_like(norm, float("inf")) if calls["n"] == 2 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", inf_at_step_2)
    Trainer(make_train_config(train_corpus, "optim.accum_steps=1", "trainer.max_steps=3"), tmp_path).fit()
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert any("step 2 skipped: non-finite gradient" in line for line in lines)
    (step_2,) = [line for line in lines if "epoch 0 step 2: loss" in line]
    assert "grad norm - (step skipped)" in step_2
    (step_3,) = [line for line in lines if "epoch 0 step 3: loss" in line]
    assert "skipped" not in step_3 and "grad norm inf" not in step_3


def test_nan_estimates_are_not_written_as_tensorboard_audio(train_corpus, tmp_path):
    import warnings

    trainer = Trainer(make_train_config(train_corpus, "trainer.tensorboard=true"), tmp_path, loaders=(None, None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value encountered in cast" reached the user
        trainer.run_log.audio("x", torch.ones(100), torch.full((2, 100), float("nan")), torch.ones(2, 100), step=0,
                              sample_rate=8000)
    trainer.close()


def test_a_run_log_without_tensorboard_takes_every_call_as_a_no_op(tmp_path):
    """As on ranks other than 0 (nothing opened): audio raised AttributeError on the missing writer."""
    from mossformer2.training.run_log import RunLog

    run_log = RunLog(tmp_path)
    run_log.scalars({"loss": 1.0}, step=0)
    run_log.audio("x", torch.ones(100), torch.ones(2, 100), torch.ones(2, 100), step=0, sample_rate=8000)
    run_log.flush()
    assert list(tmp_path.iterdir()) == []


def test_config_yaml_names_the_data_with_absolute_paths(train_corpus, tmp_path, monkeypatch):
    import os

    from mossformer2.training.config import load_train_config

    pre = tmp_path / "pre.pt"
    mossformer2.save_checkpoint(pre, mossformer2.build_model(make_train_config(train_corpus).model))
    monkeypatch.chdir(tmp_path)
    train = os.path.relpath(train_corpus.train_utterances, tmp_path)
    cfg = make_train_config(train_corpus, f"data.dynamic_mixing.train_utterances={train}", "trainer.init_from=pre.pt")
    Trainer(cfg, "exp", loaders=(None, None)).close()
    monkeypatch.chdir(tmp_path / "exp")  # used from elsewhere, the saved config names the same files
    saved = load_train_config("config.yaml")
    assert saved.data.dynamic_mixing.train_utterances == train_corpus.train_utterances
    assert saved.trainer.init_from == str(pre) and saved.optim == cfg.optim


def test_init_from_takes_model_names_as_separate_does(train_corpus, monkeypatch, tmp_path):
    """`trainer.init_from=default` (the built-in model, to fine-tune it) was made a path of the launch folder:
    "trainer.init_from /here/default: checkpoint not found"."""
    from mossformer2.training.checkpointing import load_pretrained
    from mossformer2.training.config import with_absolute_paths

    builtin = mossformer2.load_model("default")
    cfg = make_train_config(train_corpus, "trainer.init_from=default")
    monkeypatch.chdir(tmp_path)
    assert with_absolute_paths(cfg).trainer.init_from == "default"
    local = make_train_config(train_corpus, "trainer.init_from=w.pt")
    assert with_absolute_paths(local).trainer.init_from == str(tmp_path / "w.pt")
    loaded = load_pretrained("default", builtin.config)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), builtin.state_dict().values()))
    assert loaded.separation_settings == builtin.separation_settings != {}


def test_a_failed_start_leaves_no_log_or_event_file_and_checks_init_from_first(train_corpus, tmp_path, monkeypatch):
    """A bad trainer.init_from (missing, another architecture, not a checkpoint) fails before the data is read
    (minutes with data.cache_audio) and leaves no folder; a folder holding a checkpoint is taken, as `separate
    --checkpoint` takes it."""
    from mossformer2.training import trainer as trainer_module

    pre = tmp_path / "pre.pt"
    mossformer2.save_checkpoint(pre, mossformer2.build_model(make_train_config(train_corpus,
                                                                               "model.num_mossformer_layer=2").model))
    not_a_checkpoint = tmp_path / "list.csv"
    not_a_checkpoint.write_text("mix,s1,s2\n")
    load_data = trainer_module.create_dataloaders
    monkeypatch.setattr(trainer_module, "create_dataloaders", lambda *a: pytest.fail("the data was read first"))
    for path, error, match in ((pre, ValueError, "model config differs"),
                               (not_a_checkpoint, ValueError, "list.csv"),
                               (tmp_path / "none.pt", FileNotFoundError, "none.pt: checkpoint not found")):
        with pytest.raises(error, match=f"^trainer.init_from .*{match}"):
            Trainer(make_train_config(train_corpus, f"trainer.init_from={path}", "trainer.tensorboard=true"),
                    tmp_path / "ft")
        assert not (tmp_path / "ft").exists()
    (tmp_path / "old").mkdir()  # a folder that existed keeps what it held, and gets nothing new
    with pytest.raises(ValueError, match="model config differs"):
        Trainer(make_train_config(train_corpus, f"trainer.init_from={pre}", "trainer.tensorboard=true"),
                tmp_path / "old")
    assert [p.name for p in (tmp_path / "old").iterdir()] in ([], [".lock"])
    monkeypatch.setattr(trainer_module, "create_dataloaders", load_data)
    run = tmp_path / "run"  # a trainer folder: its best.pt
    run.mkdir()
    model = mossformer2.build_model(make_train_config(train_corpus).model)
    mossformer2.save_checkpoint(run / "best.pt", model)
    mossformer2.save_checkpoint(run / "last.pt", mossformer2.build_model(make_train_config(train_corpus).model))
    trainer = Trainer(make_train_config(train_corpus, f"trainer.init_from={run}"), tmp_path / "ft")
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.state_dict().values(), model.state_dict().values()))
    trainer.close()


def test_cli_on_a_folder_in_use_leaves_its_synthetic_corpus_alone(tmp_path):
    """A second `train` with other data.synthetic_* settings or seed once rebuilt the running run's corpus
    before the lock stopped it."""
    from mossformer2.cli import main
    from mossformer2.training.config import load_train_config, save_train_config
    from mossformer2.training.experiment import ExperimentLock

    cfg = train_config_from_dict({"model": TRAIN_TINY_MODEL, "data": {
        "sample_rate": 8000, "synthetic": True, "synthetic_speakers": 4, "synthetic_utterances": 1,
        "synthetic_seconds": 0.3, "segment_seconds": 0.2, "num_workers": 0, "dynamic_mixing": {
            "examples_per_epoch": 2, "valid_examples": 2, "valid_max_seconds": 0.25}},
        "trainer": {"device": "cpu", "max_steps": 1, "progress_bar": False, "tensorboard": False}})
    save_train_config(cfg, tmp_path / "c.yaml")
    exp = tmp_path / "exp"
    running = ExperimentLock(exp)  # run A, training in exp/ on the corpus it made
    prepare_synthetic_data(cfg, exp / "synthetic")
    corpus_files = {p: p.read_bytes() for p in (exp / "synthetic").rglob("*") if p.is_file()}
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--exp-dir", str(exp), "trainer.seed=5"]) == 1
    assert {p: p.read_bytes() for p in (exp / "synthetic").rglob("*") if p.is_file()} == corpus_files
    running.release()
    # Once the folder is free, the run makes its corpus there; config.yaml names it from anywhere.
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--exp-dir", str(exp), "trainer.seed=5"]) == 0
    assert '"seed": 5' in (exp / "synthetic" / "complete.txt").read_text()
    written = load_train_config(exp / "config.yaml")
    assert written.data.dynamic_mixing.train_utterances == str((exp / "synthetic" / "train").absolute())
    assert not written.data.synthetic


def _signal_in_validation(monkeypatch, signum: int) -> None:
    """Send ``signum`` to this process while the first validation batch is scored."""
    import os

    from mossformer2.training import trainer as trainer_module

    original, calls = trainer_module.si_sdr, {"n": 0}

    def signalled_si_sdr(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "si_sdr", signalled_si_sdr)


@pytest.mark.parametrize("when", ["last step", "validation"])
def test_a_signal_at_the_end_of_an_epoch_stops_before_validating_and_the_resume_validates_first(
        train_corpus, tmp_path, monkeypatch, when):
    """A signal in an epoch's last step or during its validation once waited for a whole validation (minutes on
    a full cv set: longer than a preemption's grace time)."""
    import signal

    from mossformer2.training.experiment import TrainingInterrupted

    cfg = make_train_config(train_corpus, "trainer.checkpoint_every_steps=null",
                            "data.valid_batch_size=1")  # 2 valid batches
    reference = Trainer(cfg, tmp_path / "ref")
    reference.fit()
    validations = {"n": 0}
    original_validate = Trainer.validate

    def counted_validate(self):
        validations["n"] += 1
        return original_validate(self)

    monkeypatch.setattr(Trainer, "validate", counted_validate)
    if when == "last step":
        _signal_at_step(monkeypatch, 4, signal.SIGTERM)  # 4 optimizer steps per epoch
    else:
        _signal_in_validation(monkeypatch, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        Trainer(cfg, tmp_path / "run").fit()
    assert validations["n"] == (0 if when == "last step" else 1)
    last = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert (last["step"], last["epoch"], last["trainer_state"]["batches_done"]) == (4, 0, 8)
    assert last["trainer_state"]["history"] == [] and not (tmp_path / "run" / "best.pt").exists()
    assert "interrupted by SIGTERM at step 4 (end of epoch 0, before its validation): state saved to" in (
        tmp_path / "run" / "train.log").read_text()
    monkeypatch.undo()
    resumed = Trainer(cfg, tmp_path / "run")
    resumed.fit()  # validates epoch 0 first, then trains epoch 1
    assert resumed.state.step == 8 and resumed.state.history == reference.state.history
    assert resumed.state.skipped_files == reference.state.skipped_files
    assert_bitwise_equal(weights(reference.model), weights(resumed.model))


def test_a_signal_received_during_fit_does_not_cut_a_later_validation_short(train_corpus, tmp_path, monkeypatch):
    """fit() forgot the signal its rank received but kept the one all ranks agreed on, so every later validate()
    of that trainer stopped at its first batch and returned None."""
    import signal

    from mossformer2.training.experiment import TrainingInterrupted

    _signal_at_step(monkeypatch, 1, signal.SIGINT)
    trainer = Trainer(make_train_config(train_corpus, *FAST), tmp_path)
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    monkeypatch.undo()
    valid = trainer.validate()
    assert valid is not None and valid["count"] == 2
    assert trainer.stop_reason == "interrupted by SIGINT"  # the record of why fit() stopped stays


def test_forked_workers_ignore_the_stop_signal():
    """DataLoader workers inherit the handler; a terminal's Ctrl-C reaches them too: each once logged the stop
    into train.log and called its own copy of on_stop."""
    import os
    import signal

    from mossformer2.training.experiment import stop_signals

    got: list[int] = []
    with stop_signals(got.append):
        pid = os.fork()
        if pid == 0:  # the worker
            os.kill(os.getpid(), signal.SIGINT)
            os._exit(10 + len(got))
        _, status = os.waitpid(pid, 0)
        os.kill(os.getpid(), signal.SIGINT)  # the main process still stops
    assert os.waitstatus_to_exitcode(status) == 10 and got == [signal.SIGINT]


def test_a_rerun_of_a_run_killed_before_its_first_checkpoint_logs_each_step_once(train_corpus, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_train_config(train_corpus, "trainer.tensorboard=true", "trainer.checkpoint_every_steps=null")
    rerun = killed_and_resumed(cfg, tmp_path, monkeypatch, kill_at_call=3)  # logged steps 1-2, no last.pt
    assert rerun.state.step == 0
    rerun.fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))  # not 1, 2, 1, 2, 3, ...


def test_resume_compares_the_saved_init_from_as_this_config_normalises_it(train_corpus, tmp_path, monkeypatch, caplog):
    """A saved ``~/pre.pt`` (or an older checkpoint's relative path) was made absolute against the current
    folder: a spurious "is ignored" warning, and a wrong path in config.yaml."""
    import logging

    from mossformer2.training.config import load_train_config

    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    first = Trainer(make_train_config(train_corpus), tmp_path / "exp", loaders=(None, None))
    ckpt_path = tmp_path / "exp" / "last.pt"

    def resumed_init_from(saved: str, *overrides: str) -> str | None:
        first.cfg = dataclasses.replace(first.cfg, trainer=dataclasses.replace(first.cfg.trainer, init_from=saved))
        first.save_checkpoint(ckpt_path)
        Trainer(make_train_config(train_corpus, *overrides), tmp_path / "exp", loaders=(None, None)).close()
        return load_train_config(tmp_path / "exp" / "config.yaml").trainer.init_from

    first.close()
    with caplog.at_level(logging.WARNING, logger="mossformer2.training"):
        assert resumed_init_from("~/pre.pt", "trainer.init_from=~/pre.pt") == str(home / "pre.pt")
        assert "is ignored" not in caplog.text
        assert resumed_init_from("pre.pt") == "pre.pt"  # relative to an unknown launch folder: kept as given


def test_an_error_during_training_is_recorded_in_train_log(train_corpus, tmp_path, monkeypatch):
    """train.log, the run's record, ended with "training in ..." when a bad file stopped the run: the error went
    to the terminal only."""
    calls = {"n": 0}
    original = Trainer._optimizer_step

    def failing_step(self, bad):
        calls["n"] += 1
        if calls["n"] == 5:
            raise ValueError("cannot use audio file x.wav: it contains NaN or infinite samples")
        return original(self, bad)

    monkeypatch.setattr(Trainer, "_optimizer_step", failing_step)
    with pytest.raises(ValueError, match="x.wav"):
        Trainer(make_train_config(train_corpus), tmp_path / "exp").fit()
    log_text = (tmp_path / "exp" / "train.log").read_text()
    assert "8 batches per epoch; 4 examples per optimizer step (1 process(es) x batch 2 x optim.accum_steps 2)" \
        in log_text
    last_line = log_text.strip().splitlines()[-1]
    assert "ERROR stopped by an error at epoch 1, step 4 (last.pt holds step 4): ValueError: cannot use audio " \
           "file x.wav" in last_line, last_line


def test_tensorboard_holds_each_examples_references_once_and_its_estimates_every_validation(train_corpus, tmp_path):
    """The audio had the estimates only (in the network's own speaker order) and the mixture again each epoch."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_train_config(train_corpus, "trainer.max_epochs=2", "trainer.tensorboard=true",
                            "trainer.audio_examples=1")
    Trainer(cfg, tmp_path).fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"audio": 0}).Reload()
    tags = events.Tags()["audio"]
    names = {tag.split("/")[1] for tag in tags}
    assert len(names) == 1
    (name,) = names
    assert sorted(tag.split("/")[2] for tag in tags) == ["mix", "reference1", "reference2", "s1", "s2"]
    counts = {tag.split("/")[2]: len(events.Audio(tag)) for tag in tags}
    assert counts == {"mix": 1, "reference1": 1, "reference2": 1, "s1": 2, "s2": 2}


def test_the_synthetic_corpus_validates_on_voices_it_does_not_train_on(train_corpus):
    """The held-out speakers were generated on the same spread of voices as the training ones: voice k of each
    split had one pitch and formant scale, and one name (spk00 ...), which the data check rightly warned about."""
    from pathlib import Path

    train = sorted(p.name for p in Path(train_corpus.train_utterances).iterdir() if p.is_dir())
    valid = sorted(p.name for p in Path(train_corpus.valid_utterances).iterdir() if p.is_dir())
    assert train == ["spk00", "spk02", "spk03"] and valid == ["spk01", "spk04"]  # 5 voices, 2 held out
    from mossformer2.data.synthetic import generate_speaker_corpus

    for voices in ([1, 1], [5], [-1]):
        with pytest.raises(ValueError, match="voices must be distinct indices below num_speakers"):
            generate_speaker_corpus(train_corpus.train_utterances, 5, 1, voices=voices)


@pytest.mark.parametrize("lengths", [[10, 12], [2000, 10]])
def test_training_utterances_shorter_than_the_networks_minimum_input_train(train_corpus, tmp_path, lengths):
    """Since short utterances keep their true length (not padded into the crop), one under the network's minimum
    input (24 samples here) stopped training; validation already padded such batches."""
    from tests.data.test_datasets import _make_wsj_folder

    folder = _make_wsj_folder(tmp_path / "wsj", lengths)
    cfg = make_train_config(train_corpus, "data.dynamic_mixing=null", f"data.train={folder}", f"data.valid={folder}",
                            "data.batch_size=2", "data.cache_audio=false", "optim.accum_steps=1",
                            "trainer.max_epochs=1")
    trainer = Trainer(cfg, tmp_path / "exp")
    assert min(lengths) < trainer.model.min_input_length
    trainer.fit()
    assert trainer.state.step == 1 and trainer.state.skipped_steps == 0
    assert math.isfinite(trainer.state.history[0]["train_loss"])


def test_a_forked_child_does_not_keep_the_experiment_folder_locked(tmp_path):
    """DataLoader workers are forked with the lock's descriptor: after a SIGKILL of the run, the orphaned workers
    kept the folder locked for seconds and a restart was refused ("another training run (pid N)", N dead)."""
    import os
    import signal

    from mossformer2.training.experiment import ExperimentLock

    lock = ExperimentLock(tmp_path)
    ready, started = os.pipe()
    child = os.fork()
    if child == 0:  # a worker that outlives its parent's lock for a while
        import time

        os.write(started, b"x")  # (after the fork handlers ran)
        time.sleep(30)
        os._exit(0)
    try:
        os.read(ready, 1)
        lock._file.close()  # the run dies (its descriptor closes) while the worker lives on
        ExperimentLock(tmp_path).release()  # a restart takes the folder at once
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready)
        os.close(started)
    # A lock file closed without release() (a Trainer dropped without close()): a later child must not point the
    # file that reuses its descriptor number at /dev/null
    ExperimentLock(tmp_path / "dropped")._file.close()
    ready, started = os.pipe()
    os.write(started, b"hello")
    child = os.fork()
    if child == 0:
        os._exit(0 if os.read(ready, 5) == b"hello" else 1)
    assert os.waitpid(child, 0)[1] == 0
    os.close(ready)
    os.close(started)


def _recording_micro_steps(monkeypatch) -> list[tuple[int, float]]:
    """(epoch, loss) of every training micro-batch."""
    seen: list[tuple[int, float]] = []
    original = Trainer._micro_step

    def recording(self, batch, last_micro):
        loss = original(self, batch, last_micro)
        seen.append((self.state.epoch, loss))
        return loss

    monkeypatch.setattr(Trainer, "_micro_step", recording)
    return seen


def test_each_epochs_training_loss_is_the_mean_of_that_epochs_batches_only(train_corpus, tmp_path, monkeypatch):
    seen = _recording_micro_steps(monkeypatch)
    state = Trainer(make_train_config(train_corpus, *FAST, "trainer.max_epochs=2"), tmp_path).fit()
    assert len(state.history) == 2
    for epoch, record in enumerate(state.history):
        losses = [loss for e, loss in seen if e == epoch]
        assert len(losses) == 2
        assert record["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-9)


def test_the_logged_step_loss_is_the_mean_since_the_previous_log_line(train_corpus, tmp_path, monkeypatch):
    seen = _recording_micro_steps(monkeypatch)
    logged: list[float] = []
    original = Trainer._log_step

    def recording_log(self, loss, grad_norm, bar):
        logged.append(loss)
        return original(self, loss, grad_norm, bar)

    monkeypatch.setattr(Trainer, "_log_step", recording_log)
    # 8 batches, accum 2: 4 optimizer steps, each logged (log_every_steps=1) with its own 2 micro-batches' mean
    Trainer(make_train_config(train_corpus, "trainer.max_epochs=1", "optim.accum_steps=2", "trainer.log_every_steps=1"),
            tmp_path).fit()
    losses = [loss for _, loss in seen]
    assert len(logged) == 4 and len(losses) == 8
    for k, value in enumerate(logged):
        assert value == pytest.approx((losses[2 * k] + losses[2 * k + 1]) / 2, rel=1e-9)


def test_a_finite_step_ends_a_streak_of_nonfinite_steps(train_corpus, tmp_path, monkeypatch):
    """trainer.max_nonfinite_steps counts NaN/inf steps *in a row*: two isolated ones do not end the run."""
    calls = {"n": 0}
    original = Trainer._loss

    def nan_at_steps_1_and_3(self, est, batch):
        calls["n"] += 1
        return original(self, est, batch) * (float("nan") if calls["n"] in (1, 3) else 1.0)

    monkeypatch.setattr(Trainer, "_loss", nan_at_steps_1_and_3)
    cfg = make_train_config(train_corpus, "optim.accum_steps=1", "trainer.max_steps=4", "trainer.max_nonfinite_steps=2",
                      "trainer.checkpoint_every_steps=1")
    state = Trainer(cfg, tmp_path).fit()  # no TrainingDivergedError
    assert state.step == 4 and state.skipped_steps == 2
    assert torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)["step"] == 4


def test_accumulated_micro_batches_give_the_gradient_of_one_batch_of_their_size(train_corpus, tmp_path, monkeypatch):
    """optim.accum_steps averages the micro-batches' gradients: batch 1 x accum 2 = batch 2 x accum 1 (what
    grad_clip and the logged grad norm see; Adam alone would hide a sum, being scale-invariant)."""
    norms: list[float] = []
    original = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *args, **kwargs):
        norm = original(params, max_norm, *args, **kwargs)
        norms.append(float(norm))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    common = ("model.dropout=0.0", "data.dynamic_mixing.speed_perturb=null", "trainer.max_steps=1",
              "trainer.checkpoint_every_steps=null")
    Trainer(make_train_config(train_corpus, *common, "data.batch_size=2", "optim.accum_steps=1"),
            tmp_path / "big").fit()
    Trainer(make_train_config(train_corpus, *common, "data.batch_size=1", "optim.accum_steps=2"),
            tmp_path / "accum").fit()
    assert len(norms) == 2 and norms[0] > 0
    assert norms[1] == pytest.approx(norms[0], rel=1e-3)


def test_validation_loss_is_the_clamped_training_objective(train_corpus, tmp_path):
    """With optim.loss_clamp_db the validation loss is the loss trained on (each speaker capped at the clamp), while
    the SI-SDR is reported unclamped."""
    trainer = Trainer(make_train_config(train_corpus, "optim.loss_clamp_db=30"), tmp_path)
    trainer.close()
    refs = iter([batch["sources"] for batch in trainer.valid_loader])
    gen = torch.Generator().manual_seed(0)

    def oracle(mix, lengths=None):  # the references plus a little noise: about 60 dB and more
        ref = next(refs)
        return ref + 1e-6 * torch.randn(ref.shape, generator=gen)

    trainer.model.forward = oracle
    valid = trainer.validate()
    assert valid["si_sdr"] > 40.0
    assert valid["loss"] == pytest.approx(-30.0, abs=1e-3)


def test_resume_keeps_the_plateau_schedules_count_of_bad_epochs(train_corpus, tmp_path):
    """ReduceLROnPlateau's best score and bad-epoch count survive a resume: with plateau_patience=1 the second bad
    epoch halves the lr, also when the run was resumed between the two."""
    cfg = make_train_config(train_corpus, "optim.plateau_patience=1")
    first = Trainer(cfg, tmp_path, loaders=(None, None))
    first.scheduler.step(2.0)  # best
    first.scheduler.step(1.0)  # 1 bad epoch: not more than the patience
    assert first.lr == 1e-3
    first.save_checkpoint(tmp_path / "last.pt")
    first.close()
    resumed = Trainer(cfg, tmp_path, loaders=(None, None))
    resumed.close()
    resumed.scheduler.step(1.0)  # the 2nd bad epoch in a row
    assert resumed.lr == pytest.approx(5e-4)


def test_only_trainer_audio_examples_validation_examples_go_to_tensorboard(train_corpus, tmp_path):
    pytest.importorskip("tensorboard")
    trainer = Trainer(make_train_config(train_corpus, "trainer.tensorboard=true", "trainer.audio_examples=1",
                                  "data.valid_batch_size=1"), tmp_path)  # 2 validation batches of 1
    logged: list[str] = []
    trainer.run_log.audio = lambda name, *args: logged.append(name)
    try:
        valid = trainer.validate()
    finally:
        trainer.close()
    assert valid["count"] == 2 and len(logged) == 1


def test_a_skipped_step_leaves_the_weight_average_alone(train_corpus, tmp_path, monkeypatch):
    """trainer.ema_decay averages the weights of the steps taken: a NaN step (weights unchanged) is not averaged
    in again."""
    calls = {"n": 0}
    original_loss = Trainer._loss

    def nan_at_step_3(self, est, batch):
        calls["n"] += 1
        return original_loss(self, est, batch) * (float("nan") if calls["n"] == 3 else 1.0)

    averages: list[dict[str, torch.Tensor]] = []
    original_step = Trainer._optimizer_step

    def recording_step(self, bad):
        norm = original_step(self, bad)
        averages.append(weights(self.ema.module))
        return norm

    monkeypatch.setattr(Trainer, "_loss", nan_at_step_3)
    monkeypatch.setattr(Trainer, "_optimizer_step", recording_step)
    trainer = Trainer(make_train_config(train_corpus, "trainer.ema_decay=0.5", "optim.accum_steps=1",
                                        "trainer.max_steps=3",
                                  "trainer.checkpoint_every_steps=null"), tmp_path)
    trainer.fit()
    assert trainer.state.skipped_steps == 1 and len(averages) == 3
    assert int(trainer.ema.n_averaged) == 2
    for key, value in averages[1].items():
        assert torch.equal(value, averages[2][key]), key
    assert not math.isnan(float(next(iter(averages[2].values())).flatten()[0]))

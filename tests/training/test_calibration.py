"""Output-level calibration (training/calibration.py) and the recipe's ship.py that applies it."""

from __future__ import annotations

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mossformer2.checkpoint import load_model, save_checkpoint
from mossformer2.data.synthetic import generate_speaker_corpus
from mossformer2.models import MossFormer2
from mossformer2.models.config import tiny_test_config
from mossformer2.training.calibration import estimate_output_gain, fold_output_gain
from tests.conftest import load_script


def tiny_model(seed: int = 0) -> MossFormer2:
    torch.manual_seed(seed)
    return MossFormer2(tiny_test_config()).eval()


def test_folded_gain_scales_every_output():
    model = tiny_model()
    mix = torch.randn(2, 3000) * 0.1
    with torch.no_grad():
        before = model(mix)
        fold_output_gain(model, 0.125)
        after = model(mix)
    # Exactly proportional outputs: every scale-invariant score stays as it was.
    torch.testing.assert_close(after, before * 0.125, rtol=1e-5, atol=1e-9)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive finite"):
            fold_output_gain(model, bad)


def test_estimated_gain_is_the_least_squares_level_whatever_the_order_and_sign():
    """References built from the model's own outputs at 0.25 x (swapped order, one sign flipped): the gain that
    brings the estimates to the references is 0.25 exactly."""
    model = tiny_model(1)
    examples = []
    with torch.no_grad():
        for k in range(4):
            mix = torch.randn(2500, generator=torch.Generator().manual_seed(k)) * 0.1
            est = model(mix[None])[0]
            examples.append({"mix": mix, "sources": torch.stack([-0.25 * est[1], 0.25 * est[0]])})
    assert estimate_output_gain(model, examples) == pytest.approx(0.25, rel=1e-5)
    with pytest.raises(ValueError, match="no example"):
        estimate_output_gain(model, [])


def test_ship_writes_a_calibrated_checkpoint_with_its_provenance(tmp_path):
    ship = load_script("recipes/offline_speech/ship.py", "offline_speech_ship")
    config = tiny_test_config()
    corpus = generate_speaker_corpus(tmp_path / "train", 4, 2, seconds=0.5, sample_rate=config.sample_rate)
    model = tiny_model(2)
    save_checkpoint(tmp_path / "best.pt", model, epoch=3, step=120,
                    extra={"training": {"recipe": "x.yaml", "steps": 100}, "valid": {"valid_si_sdri": 1.5}})
    (tmp_path / "info.json").write_text('{"steps": 120, "corpus": "synthetic"}')
    out = tmp_path / "shipped.pt"
    assert ship.main([str(tmp_path / "best.pt"), "--out", str(out), "--train-utterances", str(corpus),
                      "--examples", "6", "--seconds", "0.4", "--training-json", str(tmp_path / "info.json")]) == 0
    shipped = torch.load(out, map_location="cpu", weights_only=True)
    assert shipped["training"] == {"recipe": "x.yaml", "steps": 120, "corpus": "synthetic"}
    assert shipped["valid"] == {"valid_si_sdri": 1.5} and shipped["step"] == 120 and shipped["epoch"] == 3
    gain = shipped["output_gain"]
    assert gain > 0 and gain != 1.0
    calibrated = load_model(out)
    for name, weight in model.state_dict().items():
        expected = weight * gain if name == "dec.weight" else weight
        torch.testing.assert_close(calibrated.state_dict()[name], expected, rtol=1e-6, atol=0.0)
    # Shipping the shipped file again measures a gain of 1 on the same mixtures and keeps the product.
    again = tmp_path / "again.pt"
    ship.main([str(out), "--out", str(again), "--train-utterances", str(corpus), "--examples", "6",
               "--seconds", "0.4"])
    assert torch.load(again, weights_only=True)["output_gain"] == pytest.approx(gain, rel=1e-4)


def test_ship_records_recommended_refinements_without_touching_the_weights(tmp_path):
    ship = load_script("recipes/offline_speech/ship.py", "offline_speech_ship")
    model = tiny_model(3)
    save_checkpoint(tmp_path / "best.pt", model, extra={"output_gain": 0.5})
    out = tmp_path / "shipped.pt"
    assert ship.main([str(tmp_path / "best.pt"), "--out", str(out), "--no-calibrate", "--polarity-ensemble",
                      "--no-mixture-consistency"]) == 0
    shipped = torch.load(out, weights_only=True)
    assert shipped["separation"] == {"polarity_ensemble": True, "mixture_consistency": False}
    assert shipped["output_gain"] == 0.5
    for name, weight in model.state_dict().items():
        assert torch.equal(shipped["model"][name], weight)
    # Shipping again without the flags keeps the recommendation; one flag changes only its own setting.
    ship.main([str(out), "--out", str(out), "--no-calibrate", "--mixture-consistency"])
    assert torch.load(out, weights_only=True)["separation"] == {"polarity_ensemble": True, "mixture_consistency": True}
    with pytest.raises(SystemExit, match="--train-utterances"):
        ship.main([str(out), "--out", str(out)])


def test_ship_refuses_a_resumable_state_unless_told_which_weights(tmp_path, capsys):
    """A trainer last.pt of an EMA run: 'model' is the raw weights, 'ema' the average that validation scored
    (and that best.pt holds). Shipping it silently took the raw weights."""
    ship = load_script("recipes/offline_speech/ship.py", "offline_speech_ship")
    average, raw = tiny_model(4), tiny_model(5)
    ema = AveragedModel(average, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    ema.n_averaged += 7
    save_checkpoint(tmp_path / "last.pt", raw, torch.optim.SGD(raw.parameters(), lr=0.1), epoch=2, step=7,
                    extra={"ema": ema.state_dict(), "trainer_state": {"step": 7}})
    out = tmp_path / "shipped.pt"
    common = ["--out", str(out), "--no-calibrate", "--force"]
    with pytest.raises(SystemExit, match=r"resumable training state \(optimizer, trainer_state, ema\).*best\.pt"):
        ship.main([str(tmp_path / "last.pt"), *common])
    assert not out.exists()

    assert ship.main([str(tmp_path / "last.pt"), *common, "--weights", "ema"]) == 0
    assert "the moving average ('ema', 7 updates)" in capsys.readouterr().out
    shipped = torch.load(out, weights_only=True)
    assert not {"optimizer", "ema", "trainer_state"} & set(shipped)
    for name, weight in average.state_dict().items():
        assert torch.equal(shipped["model"][name], weight)

    assert ship.main([str(tmp_path / "last.pt"), *common, "--weights", "model"]) == 0
    assert "weights: 'model' of" in capsys.readouterr().out
    for name, weight in raw.state_dict().items():
        assert torch.equal(torch.load(out, weights_only=True)["model"][name], weight)
    with pytest.raises(SystemExit, match="no moving average"):
        ship.main([str(out), *common, "--weights", "ema"])


def test_ship_without_calibration_refuses_a_never_calibrated_model(tmp_path, capsys):
    ship = load_script("recipes/offline_speech/ship.py", "offline_speech_ship")
    model = tiny_model(6)
    save_checkpoint(tmp_path / "best.pt", model, extra={"valid": {"valid_si_sdri": 2.0}})  # no output_gain
    out = tmp_path / "shipped.pt"
    with pytest.raises(SystemExit, match="never calibrated.*--force"):
        ship.main([str(tmp_path / "best.pt"), "--out", str(out), "--no-calibrate"])
    assert not out.exists()
    # Mixture consistency shares out a residual that, on uncalibrated outputs, is mostly level error: never.
    with pytest.raises(SystemExit, match="mixture consistency"):
        ship.main([str(tmp_path / "best.pt"), "--out", str(out), "--no-calibrate", "--force", "--mixture-consistency"])
    assert not out.exists()
    assert ship.main([str(tmp_path / "best.pt"), "--out", str(out), "--no-calibrate", "--force",
                      "--polarity-ensemble"]) == 0
    assert "UNCALIBRATED" in capsys.readouterr().out
    shipped = torch.load(out, weights_only=True)
    assert "output_gain" not in shipped and shipped["separation"] == {"polarity_ensemble": True}
    # No output_gain recorded, so shipping the result again is refused as well.
    with pytest.raises(SystemExit, match="never calibrated"):
        ship.main([str(out), "--out", str(out), "--no-calibrate"])


def test_ship_warns_when_calibrating_on_a_held_out_split(tmp_path, capsys):
    ship = load_script("recipes/offline_speech/ship.py", "offline_speech_ship")
    config = tiny_test_config()
    held_out = generate_speaker_corpus(tmp_path / "corpus" / "valid", 2, 2, seconds=0.3,
                                       sample_rate=config.sample_rate)
    save_checkpoint(tmp_path / "best.pt", tiny_model(7))
    out = tmp_path / "shipped.pt"
    assert ship.main([str(tmp_path / "best.pt"), "--out", str(out), "--train-utterances", f"{held_out}/",
                      "--examples", "2", "--seconds", "0.25"]) == 0
    assert "held-out split" in capsys.readouterr().err
    assert torch.load(out, weights_only=True)["output_gain"] > 0

"""recipes/offline_speech/pack_corpus.py: Opus pack of a corpus for a time-boxed GPU machine."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mossformer2.data.dynamic_mixing import load_utterances
from mossformer2.models.config import tiny_test_config
from tests.conftest import load_script

pack_corpus = load_script("recipes/offline_speech/pack_corpus.py", "offline_speech_pack_corpus")


@pytest.fixture()
def corpus(tmp_path):
    """A corpus in prepare.py's layout: 2 train speakers x 2 files, valid speakers with 3 and 1 files, 1 test file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "corpus"
    rows = []
    layout = [("train", "a", 2), ("train", "b", 2), ("valid", "v", 3), ("valid", "w", 1), ("test", "t", 1)]
    for split, speaker, count in layout:
        for i in range(count):
            rel = f"{split}/{speaker}/{speaker}_{i:04d}.wav"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            t = np.arange(16000) / 16000
            wave = 0.3 * np.sin(2 * np.pi * (150 + 50 * i) * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
            sf.write(root / rel, (wave + 0.01 * rng.standard_normal(16000)).astype(np.float32), 16000)
            rows.append([rel, split, speaker, "pkg", "GPL-2", "1.000", "x.ogg"])
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "split", "speaker", "source_package", "licence", "duration_s", "sources"])
        writer.writerows(rows)
    (root / "LICENSES.md").write_text("# Licences\n")
    return root


def test_pack_writes_opus_train_and_a_valid_subset(corpus, tmp_path):
    out = tmp_path / "pack"
    code = pack_corpus.main(["--corpus", str(corpus), "--out", str(out), "--valid-files-per-speaker", "2"])
    assert code == 0
    summary = json.loads((out / "pack.json").read_text())
    assert summary["files"] == {"train": 4, "valid": 3} and summary["speakers"] == {"train": 2, "valid": 2}
    assert not (out / "test").exists() and (out / "LICENSES.md").is_file()
    for row in csv.DictReader((out / "manifest.csv").open()):
        assert row["path"].endswith(".opus")
        audio, rate = sf.read(out / row["path"], dtype="float32")
        original, _ = sf.read(corpus / row["path"].replace(".opus", ".wav"), dtype="float32")
        assert rate == 16000 and audio.shape == original.shape
    assert summary["coded_si_sdr_db"]["median"] > 10  # lossy, but close to the source
    utterances = load_utterances(out / "train")  # the trainer's dynamic mixing reads the pack as it is
    assert sorted({u.speaker for u in utterances}) == ["a", "b"] and len(utterances) == 4


def test_pack_refuses_oversize_or_existing_output_and_leaves_nothing(corpus, tmp_path, capsys):
    out = tmp_path / "pack"
    assert pack_corpus.main(["--corpus", str(corpus), "--out", str(out), "--max-mib", "0.001"]) == 1
    assert "over --max-mib" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no pack, no temporary folder
    out.mkdir()
    assert pack_corpus.main(["--corpus", str(corpus), "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert pack_corpus.main(["--corpus", str(tmp_path / "nothing"), "--out", str(tmp_path / "p2")]) == 1
    assert "prepare.py" in capsys.readouterr().err


REPO = Path(__file__).resolve().parents[2]
TINY_OVERRIDES = [f"model.{key}={value}" for key, value in asdict(tiny_test_config()).items()] + [
    "data.segment_seconds=0.25", "data.batch_size=2", "data.valid_batch_size=2",
    "data.num_workers=0", "data.dynamic_mixing.examples_per_epoch=4", "data.dynamic_mixing.valid_examples=2",
    "data.dynamic_mixing.valid_max_seconds=0.25", "trainer.device=cpu", "trainer.precision=fp32",
    "trainer.init_from=null",
]


@pytest.mark.parametrize(("config", "n_params"), [("gpu_model.yaml", 1_223_722), ("gpu_small.yaml", 245_658)])
def test_gpu_configs_are_valid_the_documented_size_and_start_from_matching_weights(config, n_params):
    from mossformer2 import build_model
    from mossformer2.checkpoint import load_model
    from mossformer2.training.config import load_train_config

    cfg = load_train_config(REPO / "recipes/offline_speech" / config)
    cfg.validate()
    model = build_model(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == n_params  # the size the yaml and README state
    # init_from names weights kept in the repo, of this very architecture (load_model raises on a mismatch).
    assert load_model(REPO / cfg.trainer.init_from, config=cfg.model).config == cfg.model


def test_gpu_session_script_trains_from_the_pack_and_resumes(corpus, tmp_path):
    import subprocess

    import torch

    pack = tmp_path / "pack"
    assert pack_corpus.main(["--corpus", str(corpus), "--out", str(pack)]) == 0
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable, "WHEELS": str(tmp_path / "none"),
           "PACK": str(pack), "MINUTES": "5", "OMP_NUM_THREADS": "1"}

    def run(out: Path, exp: Path, state: Path, steps: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "recipes/offline_speech/gpu_session.sh", *TINY_OVERRIDES, f"trainer.max_steps={steps}"],
            cwd=REPO, env={**env, "OUT": str(out), "EXP": str(exp), "STATE": str(state)},
            capture_output=True, text=True, timeout=300,
        )

    first = run(tmp_path / "out1", tmp_path / "exp1", tmp_path / "no_state.pt", steps=2)
    assert first.returncode == 0, first.stderr[-2000:]
    returned = {p.name for p in (tmp_path / "out1").iterdir()}
    assert {"last.pt", "best.pt", "train.log", "config.yaml", "gpu.txt"} <= returned
    assert torch.load(tmp_path / "out1/last.pt", map_location="cpu", weights_only=True)["step"] == 2
    # The next call starts from the state that came back (a fresh machine: a new exp folder).
    second = run(tmp_path / "out2", tmp_path / "exp2", tmp_path / "out1/last.pt", steps=4)
    assert second.returncode == 0, second.stderr[-2000:]
    assert torch.load(tmp_path / "out2/last.pt", map_location="cpu", weights_only=True)["step"] == 4
    assert "resum" in (tmp_path / "out2/train.log").read_text().lower()
    # A failing run still returns what it wrote and shows the end of its console output.
    failed = subprocess.run(["bash", "recipes/offline_speech/gpu_session.sh", *TINY_OVERRIDES, "optim.lr=-1"],
                            cwd=REPO, env={**env, "OUT": str(tmp_path / "out3"), "EXP": str(tmp_path / "exp3"),
                                           "STATE": str(tmp_path / "no_state.pt")},
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    assert "error: training" in failed.stderr and "optim.lr" in failed.stderr
    assert (tmp_path / "out3/gpu.txt").is_file()
    missing = subprocess.run(["bash", "recipes/offline_speech/gpu_session.sh"], cwd=REPO,
                             env={**env, "PACK": str(tmp_path / "nothing"), "OUT": str(tmp_path / "o3")},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no packed corpus" in missing.stderr

"""`mossformer2 evaluate` end to end on mixtures made by our own `mix`: oracle and tiny-model checkpoints."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

import mossformer2
from mossformer2.cli import main
from mossformer2.data.manifests import load_manifest
from mossformer2.evaluation import evaluate
from mossformer2.evaluation.evaluate import _read_previous_rows, csv_header
from mossformer2.separation import Separator
from tests.evaluation.test_mix import make_speaker_folder

NUM_MIXTURES = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Four two-speaker mixtures (about 1 s each) in the wsj0-2mix layout, made by `mossformer2 mix`."""
    root = tmp_path_factory.mktemp("eval")
    speakers = make_speaker_folder(root / "speakers", speakers=3, files=2)
    out = root / "mixtures"
    assert main(["mix", str(speakers), "-o", str(out), "--num-mixtures", str(NUM_MIXTURES), "--seed", "7",
                 "--subtype", "FLOAT"]) == 0
    return out


class OracleModel(torch.nn.Module):
    """Returns the true sources of whichever known mixture it is given (scaled like the input), speakers
    swapped: perfect separation that only PIT alignment can score as perfect."""

    def __init__(self, data: Path) -> None:
        super().__init__()
        self.config = SimpleNamespace(sample_rate=16000, num_spks=2, encoder_kernel_size=16)
        self.known = []
        for entry in load_manifest(data):
            mix = sf.read(str(entry.mix), dtype="float32")[0]
            sources = np.stack([sf.read(str(p), dtype="float32")[0] for p in entry.sources])
            self.known.append((torch.from_numpy(mix), torch.from_numpy(sources[::-1].copy())))
        self.calls = 0

    def forward(self, wave: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, S, T]
        self.calls += 1
        outputs = []
        for x in wave:
            mix, sources = next((m, s) for m, s in self.known if m.shape == x.shape
                                and torch.nn.functional.cosine_similarity(m, x, dim=0) > 0.999)
            gain = (x @ mix) / (mix @ mix)
            outputs.append(gain * sources)
        return torch.stack(outputs)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_oracle_reaches_high_scores_and_summary_matches_csv(dataset, tmp_path):
    oracle = OracleModel(dataset)
    sep = Separator(oracle, device="cpu")
    summary = evaluate(sep, dataset / "metadata.csv", tmp_path / "out", progress=False)
    rows = read_csv(tmp_path / "out" / "per_utterance.csv")
    assert [r["id"] for r in rows] == [e.id for e in load_manifest(dataset)]
    assert list(rows[0]) == ["id", "duration_s", "si_sdr", "si_sdri", "sdr", "sdri", "pesq", "stoi",
                             "permutation", "status", "error"]
    assert all(r["status"] == "ok" and r["permutation"] == "1 0" for r in rows)
    assert all(float(r["si_sdr"]) > 60 and float(r["sdr"]) > 60 for r in rows)
    assert all(float(r["pesq"]) > 4.4 and float(r["stoi"]) > 0.99 for r in rows)
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for column in ("si_sdr", "si_sdri", "sdr", "sdri", "pesq", "stoi"):
        values = [float(r[column]) for r in rows]
        stats = on_disk["scores"][column]
        assert stats["count"] == NUM_MIXTURES
        assert stats["mean"] == pytest.approx(np.mean(values), abs=1e-4)
        assert stats["median"] == pytest.approx(np.median(values), abs=1e-4)
        assert stats["std"] == pytest.approx(np.std(values), abs=1e-4)
    # SI-SDRi is the gain over the mixture, whose SI-SDR is about -SIR/2 .. +SIR/2 dB: far below 60
    assert on_disk["scores"]["si_sdri"]["mean"] > 50
    assert on_disk["num_failed"] == 0 and on_disk["num_scored"] == NUM_MIXTURES
    assert on_disk["data"] == str((dataset / "metadata.csv").resolve())
    assert on_disk["settings"]["metrics"] == ["si_sdr", "sdr", "pesq", "stoi"]


def test_resume_skips_scored_mixtures_and_survives_a_cut_off_line(dataset, tmp_path):
    oracle = OracleModel(dataset)
    sep = Separator(oracle, device="cpu")
    out = tmp_path / "out"
    evaluate(sep, dataset, out, metrics="si_sdr", limit=2, progress=False)
    assert oracle.calls == 2
    csv_path = out / "per_utterance.csv"
    with csv_path.open("a") as f:
        f.write("half-written-row,0.9")  # a crash in the middle of a row: no newline
    summary = evaluate(sep, dataset, out, metrics="si_sdr", progress=False)
    assert oracle.calls == NUM_MIXTURES  # only the two new mixtures were separated
    assert summary["num_skipped_already_scored"] == 2 and summary["num_scored"] == NUM_MIXTURES
    rows = read_csv(csv_path)
    assert len(rows) == NUM_MIXTURES and len({r["id"] for r in rows}) == NUM_MIXTURES
    assert evaluate(sep, dataset, out, metrics="si_sdr", progress=False)["num_csv_rows_not_summarised"] == 0
    assert oracle.calls == NUM_MIXTURES  # nothing left to do
    fewer = evaluate(sep, dataset, out, metrics="si_sdr", limit=1, progress=False)  # the CSV keeps the others
    assert fewer["num_mixtures"] == 1 and fewer["num_csv_rows_not_summarised"] == NUM_MIXTURES - 1
    assert len(read_csv(csv_path)) == NUM_MIXTURES
    with pytest.raises(ValueError, match=r"other settings \(metrics \['si_sdr'\] -> \['si_sdr', 'stoi'\]\)"):
        evaluate(sep, dataset, out, metrics="si_sdr,stoi", progress=False)
    with pytest.raises(ValueError, match="other settings.*score_rate"):
        evaluate(sep, dataset, out, metrics="si_sdr", score_rate=8000, progress=False)
    evaluate(sep, dataset, out, metrics="si_sdr", score_rate=8000, overwrite=True, progress=False)
    assert oracle.calls == 2 * NUM_MIXTURES
    with pytest.raises(ValueError, match="score_rate must be 1000 to 768000 Hz, got 100"):
        evaluate(sep, dataset, out, metrics="si_sdr", score_rate=100, overwrite=True, progress=False)


def test_a_metric_undefined_on_one_mixture_blanks_only_that_metric(dataset, tmp_path):
    """A silent output for one speaker of one mixture: its PESQ is undefined, but its SI-SDR (-80 dB) still
    counts, so the SI-SDR mean does not depend on whether PESQ was asked for."""
    sep = Separator(OracleModel(dataset), device="cpu")
    first = load_manifest(dataset)[0].mix

    def silent_on_first(wave: np.ndarray, sample_rate: int) -> np.ndarray:
        out = sep.separate(wave, sample_rate)
        if wave.shape[-1] == sf.info(str(first)).frames and np.allclose(wave, sf.read(str(first))[0], atol=1e-6):
            out[1] = 0.0
        return out

    fake = SimpleNamespace(num_spks=2, separate=silent_on_first)
    both = evaluate(fake, dataset, tmp_path / "a", metrics="si_sdr,pesq", progress=False)
    alone = evaluate(fake, dataset, tmp_path / "b", metrics="si_sdr", progress=False)
    assert both["num_scored"] == NUM_MIXTURES and both["num_failed"] == 0
    assert both["scores"]["si_sdr"] == alone["scores"]["si_sdr"]
    assert both["scores"]["si_sdr"]["count"] == NUM_MIXTURES
    assert both["scores"]["pesq"]["count"] == NUM_MIXTURES - 1
    assert both["num_incomplete"] == 1 and "PESQ failed: the estimate is silent" in both["incomplete"][0]["error"]
    row = read_csv(tmp_path / "a" / "per_utterance.csv")[0]
    assert row["status"] == "ok" and row["pesq"] == "" and row["error"].startswith("pesq: ")
    assert float(row["si_sdr"]) < 30  # the oracle's > 60 dB averaged with the silent speaker's -80 dB
    from mossformer2.evaluation.evaluate import format_table

    assert "missing: " in format_table(both)


def test_score_rate_8000_changes_scoring(dataset, tmp_path):
    sep = Separator(OracleModel(dataset), device="cpu", normalize="none")

    def with_hiss(wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """Perfect estimates plus a 6 kHz tone, which scoring at 8 kHz (4 kHz bandwidth) cannot see."""
        hiss = 0.05 * np.sin(2 * np.pi * 6000 * np.arange(wave.shape[-1]) / sample_rate)
        return sep.separate(wave, sample_rate) + hiss

    leaky = SimpleNamespace(num_spks=2, separate=with_hiss)
    full = evaluate(leaky, dataset, tmp_path / "a", metrics="si_sdr", progress=False)
    narrow = evaluate(leaky, dataset, tmp_path / "b", metrics="si_sdr", score_rate=8000, progress=False)
    assert narrow["settings"]["score_rate"] == 8000
    assert full["scores"]["si_sdr"]["mean"] < 30
    assert narrow["scores"]["si_sdr"]["mean"] > full["scores"]["si_sdr"]["mean"] + 20


def test_cli_with_tiny_checkpoint_reports_broken_files_and_resumes(dataset, tmp_path, tiny_config, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for sub in ("mix", "s1", "s2"):
        (data / sub).symlink_to(dataset / sub, target_is_directory=True)
    entries = load_manifest(dataset)
    broken, short = entries[1], entries[2]
    # a list file: one mixture with an unreadable source, one whose source is shorter than the mixture
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really audio")
    sf.write(str(tmp_path / "short.wav"), np.zeros(100, dtype=np.float32) + 0.1, 16000)
    lst = tmp_path / "test.scp"
    lst.write_text("".join(f"{e.mix} {e.sources[0]} {e.sources[1]}\n" for e in entries)
                   .replace(str(broken.sources[1]), str(tmp_path / "bad.wav"))
                   .replace(str(short.sources[0]), str(tmp_path / "short.wav")))
    checkpoint = tmp_path / "tiny.pt"
    mossformer2.save_checkpoint(checkpoint, mossformer2.build_model(tiny_config))
    out = tmp_path / "out"
    argv = ["evaluate", "--data", str(lst), "--checkpoint", str(checkpoint), "--out", str(out), "--device",
            "cpu", "--metrics", "si_sdr,sdr"]
    assert main(argv) == 1  # a failed mixture makes the exit code 1, after scoring the others
    printed = capsys.readouterr().out
    assert "si_sdri" in printed and "scored 2 of 4 mixture(s); failed 2" in printed
    rows = {r["id"]: r for r in read_csv(out / "per_utterance.csv")}
    assert rows[broken.id]["status"] == "failed" and "cannot read" in rows[broken.id]["error"]
    assert rows[short.id]["status"] == "failed" and "lengths differ" in rows[short.id]["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_failed"] == 2 and {f["id"] for f in summary["failed"]} == {broken.id, short.id}
    assert summary["scores"]["si_sdri"]["count"] == 2
    assert summary["checkpoint"] == str(checkpoint.resolve()) and summary["settings"]["dtype"] == "float32"
    assert summary["settings"]["separator"]["polarity_ensemble"] is False  # a plain checkpoint recommends none
    assert summary["settings"]["separator"]["chunk_seconds"] is None  # whole mixtures, one pass each
    # Results of other refinements are not mixed into these.
    assert main(argv + ["--polarity-ensemble"]) != 0
    assert "holds results of a run with other settings (separator.polarity_ensemble False -> True)" in \
        capsys.readouterr().err
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert all(np.isfinite(float(r["si_sdri"])) and r["permutation"] in ("0 1", "1 0") for r in ok)

    # fix the list: the failed mixtures are retried, the scored ones are skipped
    lst.write_text("".join(f"{e.mix} {e.sources[0]} {e.sources[1]}\n" for e in entries))
    assert main(argv) == 0
    assert "scored 4 of 4 mixture(s) (2 scored by an earlier run into this folder, kept); failed 0" in (
        capsys.readouterr().out)  # it said "scored 4 of 4" as if all were scored now
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_skipped_already_scored"] == 2 and summary["num_failed"] == 0
    assert summary["scores"]["sdri"]["count"] == NUM_MIXTURES
    assert len(read_csv(out / "per_utterance.csv")) == NUM_MIXTURES


def test_cli_rejects_bad_options(dataset, tmp_path, tiny_config, capsys):
    checkpoint = tmp_path / "tiny3.pt"
    mossformer2.save_checkpoint(checkpoint, mossformer2.build_model(tiny_config.__class__(
        **{**tiny_config.to_dict(), "num_spks": 3})))
    base = ["evaluate", "--data", str(dataset), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert main([*base, "--checkpoint", str(checkpoint)]) == 1
    assert "2 speakers per mixture but the model separates 3" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(checkpoint), "--metrics", "si_sdr,mos"]) == 1
    assert "unknown metric" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(checkpoint), "--score-rate", "16"]) == 1  # resampled to 16 Hz before
    assert "--score-rate must be 1000 to 768000 Hz, got 16" in capsys.readouterr().err
    assert main([*base[:2], str(tmp_path / "missing"), *base[3:], "--checkpoint", str(checkpoint)]) == 1
    assert "--data not found" in capsys.readouterr().err
    broken = tmp_path / "list.scp"
    broken.write_text(f"{tmp_path}/nope_mix.wav {tmp_path}/nope_s1.wav {tmp_path}/nope_s2.wav\n")
    assert main([*base[:2], str(broken), *base[3:], "--checkpoint", str(tmp_path / "not_loaded_yet.pt")]) == 1
    assert "3 listed file(s) do not exist" in capsys.readouterr().err  # the data is checked before the model


def test_cli_scores_every_installed_metric_by_default(dataset, tmp_path, tiny_config, capsys, monkeypatch):
    """The default was all four metrics, so a plain install (no [quality] extra) failed the README's command."""
    import importlib.util

    checkpoint = tmp_path / "tiny.pt"
    mossformer2.save_checkpoint(checkpoint, mossformer2.build_model(tiny_config))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("pesq", "pystoi") else real_find_spec(name, *a))
    out = tmp_path / "o"
    assert main(["evaluate", "--data", str(dataset), "--out", str(out), "--checkpoint", str(checkpoint),
                 "--device", "cpu", "--limit", "1"]) == 0
    err = capsys.readouterr().err
    assert "leaving out pesq: metric 'pesq' needs the pesq package: pip install 'mossformer2[quality]'" in err
    assert "leaving out stoi" in err
    assert json.loads((out / "settings.json").read_text())["metrics"] == ["si_sdr", "sdr"]


def test_load_mixture_reports_mismatched_rates(dataset, tmp_path):
    from mossformer2.data.manifests import MixtureEntry
    from mossformer2.evaluation import load_mixture

    entry = load_manifest(dataset)[0]
    mix, refs, rate = load_mixture(entry)
    assert rate == 16000 and refs.shape == (2, mix.shape[-1])
    slow = tmp_path / "s2_8k.wav"
    sf.write(str(slow), refs[1, ::2], 8000)
    with pytest.raises(ValueError, match=r"sample rates differ: mixture 16000 Hz, source 2 \(s2_8k.wav\) 8000"):
        load_mixture(MixtureEntry(id="x", mix=entry.mix, sources=[entry.sources[0], slow]))


def test_resume_refuses_other_weights_at_the_same_checkpoint_path(dataset, tmp_path, tiny_config, capsys):
    """`exp/best.pt` after more training: the old rows were kept and averaged with the new weights' rows."""
    checkpoint = tmp_path / "best.pt"
    mossformer2.save_checkpoint(checkpoint, mossformer2.build_model(tiny_config))
    out = tmp_path / "out"
    argv = ["evaluate", "--data", str(dataset), "--checkpoint", str(checkpoint), "--out", str(out), "--device",
            "cpu", "--metrics", "si_sdr", "--dtype", "float16"]
    assert main([*argv, "--limit", "1"]) == 0
    settings = json.loads((out / "settings.json").read_text())
    import hashlib

    assert settings["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    # float16 needs CUDA: the CPU ran float32, and that is what the results record
    assert settings["dtype"] == "float32"
    assert json.loads((out / "summary.json").read_text())["settings"]["dtype"] == "float32"
    torch.manual_seed(1)
    mossformer2.save_checkpoint(checkpoint, mossformer2.build_model(tiny_config))  # other weights, same path
    capsys.readouterr()
    assert main([*argv, "--limit", "2"]) == 1
    assert ("holds results of a run with other settings (checkpoint_sha256: other weights at the same checkpoint "
            "path); evaluate into a new --out folder or pass --overwrite") in capsys.readouterr().err
    assert len(read_csv(out / "per_utterance.csv")) == 1  # nothing added
    # A settings.json written before the weights were recorded: resumed, with a warning that says so.
    del settings["checkpoint_sha256"]
    (out / "settings.json").write_text(json.dumps(settings))
    assert main([*argv, "--limit", "2"]) == 0
    assert "does not record which weights scored the results" in capsys.readouterr().err
    assert "checkpoint_sha256" in json.loads((out / "settings.json").read_text())
    assert main([*argv, "--limit", "2", "--overwrite"]) == 0


def test_multichannel_references_fail_their_row_and_stereo_mixtures_are_downmixed_once(dataset, tmp_path):
    entries = load_manifest(dataset)[:3]
    data = tmp_path / "odd"
    for sub in ("mix", "s1", "s2"):
        (data / sub).mkdir(parents=True)
    for k, entry in enumerate(entries):
        mix = sf.read(str(entry.mix), dtype="float32")[0]
        s1, s2 = (sf.read(str(p), dtype="float32")[0] for p in entry.sources)
        name = f"{entry.id}.wav"
        # mixture 0: both speakers in one two-channel reference file; 1 and 2: stereo mixtures
        sf.write(str(data / "mix" / name), mix if k == 0 else np.stack([mix, mix], 1), 16000, subtype="FLOAT")
        sf.write(str(data / "s1" / name), np.stack([s1, s2], 1) if k == 0 else s1, 16000, subtype="FLOAT")
        sf.write(str(data / "s2" / name), s2, 16000, subtype="FLOAT")
    sep = Separator(OracleModel(dataset), device="cpu")
    with pytest.warns(UserWarning, match="has 2 channels: multi-channel mixtures are averaged") as caught:
        summary = evaluate(sep, data, tmp_path / "out", metrics="si_sdr", progress=False)
    assert len([w for w in caught if "channels" in str(w.message)]) == 1  # said once
    rows = {r["id"]: r for r in read_csv(tmp_path / "out" / "per_utterance.csv")}
    assert rows[entries[0].id]["status"] == "failed"
    assert f"source 1 ({entries[0].id}.wav) has 2 channels" in rows[entries[0].id]["error"]
    assert all(rows[e.id]["status"] == "ok" and float(rows[e.id]["si_sdr"]) > 60 for e in entries[1:])
    assert summary["num_failed"] == 1 and "pesq_mode" not in summary


def test_summary_names_the_pesq_mode(dataset, tmp_path):
    from mossformer2.evaluation.evaluate import format_table

    sep = Separator(OracleModel(dataset), device="cpu")
    wide = evaluate(sep, dataset, tmp_path / "wb", metrics="pesq", limit=1, progress=False)
    narrow = evaluate(sep, dataset, tmp_path / "nb", metrics="pesq", limit=1, score_rate=8000, progress=False)
    assert wide["pesq_mode"] == "wb: wide band (ITU-T P.862.2)"
    assert narrow["pesq_mode"] == "nb: narrow band (ITU-T P.862)"
    assert "pesq: nb: narrow band (ITU-T P.862)" in format_table(narrow)
    # a resumed run that scores nothing new still knows the mode of the mixtures scored before
    assert evaluate(sep, dataset, tmp_path / "wb", metrics="pesq", limit=1, progress=False)["pesq_mode"] == (
        "wb: wide band (ITU-T P.862.2)")
    assert json.loads((tmp_path / "nb" / "summary.json").read_text())["pesq_mode"].startswith("nb")


def test_a_resumed_pesq_summary_reads_only_the_headers_of_earlier_mixtures(dataset, tmp_path, monkeypatch):
    """The PESQ mode of mixtures scored by an earlier run was found by decoding each one in full after the
    scoring; one that had become unreadable since then lost the summary."""
    import dataclasses
    import shutil

    import mossformer2.audio

    entries = load_manifest(dataset)[:2]
    copies = []
    for e in entries:
        shutil.copy(e.mix, tmp_path / e.mix.name)
        copies.append(dataclasses.replace(e, mix=tmp_path / e.mix.name))
    sep = Separator(OracleModel(dataset), device="cpu")
    evaluate(sep, copies, tmp_path / "out", metrics="pesq", progress=False)

    def no_decoding(path):
        raise AssertionError(f"{path} was decoded")

    monkeypatch.setattr(mossformer2.audio, "read_audio", no_decoding)
    assert evaluate(sep, copies, tmp_path / "out", metrics="pesq", progress=False)["pesq_mode"] == (
        "wb: wide band (ITU-T P.862.2)")
    monkeypatch.undo()
    (tmp_path / entries[0].mix.name).write_bytes(b"")  # unreadable since it was scored
    summary = evaluate(sep, copies, tmp_path / "out", metrics="pesq", progress=False)
    assert summary["num_scored"] == 2 and (tmp_path / "out" / "summary.json").is_file()
    assert summary["pesq_mode"] == ("unknown: the mixture file, scored by an earlier run, can no longer be read; "
                                    "wb: wide band (ITU-T P.862.2)")


def test_a_set_of_8_and_16_khz_mixtures_gets_its_pesq_summarised_per_mode(dataset, tmp_path):
    """Narrow band PESQ (8 kHz) and wide band PESQ (other rates) were averaged into one mean."""
    from mossformer2.audio import resample
    from mossformer2.data.manifests import MixtureEntry

    entries = load_manifest(dataset)[:2]
    for path in (entries[1].mix, *entries[1].sources):
        wave, rate = sf.read(str(path), dtype="float32")
        sf.write(str(tmp_path / f"{path.parent.name}.wav"), resample(wave, rate, 8000), 8000, subtype="FLOAT")
    mixed = [entries[0], MixtureEntry("narrow", tmp_path / "mix.wav", [tmp_path / "s1.wav", tmp_path / "s2.wav"])]

    class Halves:  # any object with separate() and num_spks (and here a sample_rate)
        num_spks, sample_rate = 2, 16000

        def separate(self, wave, sample_rate):
            return np.stack([wave / 2, wave / 2])

    with pytest.warns(UserWarning) as caught:
        summary = evaluate(Halves(), mixed, tmp_path / "out", metrics="pesq", progress=False)
    messages = [str(w.message) for w in caught]
    assert any("PESQ is summarised per mode (pesq_nb, pesq_wb), not as one mean" in m for m in messages)
    assert any("mixture narrow is at 8000 Hz, the model at 16000 Hz: mixtures are resampled" in m for m in messages)
    assert summary["model_sample_rate"] == 16000
    assert "pesq" not in summary["scores"]
    assert summary["scores"]["pesq_nb"]["count"] == 1 and summary["scores"]["pesq_wb"]["count"] == 1
    assert summary["pesq_mode"] == "nb: narrow band (ITU-T P.862); wb: wide band (ITU-T P.862.2)"


def test_a_resume_from_another_folder_goes_on_and_a_refusal_names_what_changed(dataset, tmp_path, tiny_config,
                                                                                capsys, monkeypatch):
    """The checkpoint file's path (relative, or a cache snapshot) was compared on resume: the same run started from
    another folder was refused, though the weights' SHA-256 identifies them."""
    run = tmp_path / "runs" / "a"
    mossformer2.save_checkpoint(run / "best.pt", mossformer2.build_model(tiny_config))
    argv = ["evaluate", "--data", str(dataset), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--metrics", "si_sdr", "--limit", "1"]
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--checkpoint", "runs/a"]) == 0
    assert "checkpoint file: " in capsys.readouterr().err and str(run / "best.pt") in json.loads(
        (tmp_path / "out" / "summary.json").read_text())["settings"]["checkpoint_file"]
    monkeypatch.chdir(tmp_path / "runs")
    assert main([*argv, "--checkpoint", "a/best.pt", "--limit", "2"]) == 0  # the same weights, found otherwise
    assert main([*argv, "--checkpoint", "a/best.pt", "--limit", "2", "--chunk-seconds", "10"]) == 1
    err = capsys.readouterr().err
    assert "other settings (separator.chunk_seconds None -> 10.0, separator.overlap_seconds None -> 2.0)" in err
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    settings["separator"]["chunk_seconds"], settings["separator"]["overlap_seconds"] = 10.0, 2.0  # an older run's
    (tmp_path / "out" / "settings.json").write_text(json.dumps(settings))
    assert main([*argv, "--checkpoint", "a/best.pt"]) == 1
    assert "--chunk-seconds 10 --overlap-seconds 2 goes on with these results" in capsys.readouterr().err
    assert main([*argv, "--checkpoint", "a/best.pt", "--chunk-seconds", "10", "--overlap-seconds", "2"]) == 0
    # A settings.json from before the weights' SHA-256 was recorded: its checkpoint's name is all that says which
    # weights scored it, so another name is refused (as before), not merged with a warning.
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    del settings["checkpoint_sha256"]
    settings["checkpoint"] = "/elsewhere/other.pt"
    (tmp_path / "out" / "settings.json").write_text(json.dumps(settings))
    assert main([*argv, "--checkpoint", "a/best.pt", "--chunk-seconds", "10"]) == 1
    err = capsys.readouterr().err
    assert "does not record which weights" in err and "other settings (checkpoint '/elsewhere/other.pt' -> " in err


def test_each_mixtures_guessed_chunk_boundaries_are_reported_by_name(dataset, tmp_path):
    """With chunks, Python's once-per-place rule reported guessed boundaries for the first mixture only."""
    from tests.separation.test_separation import SameVoiceTwice

    entries = load_manifest(dataset)[:2]
    sep = Separator(SameVoiceTwice(), chunk_seconds=0.4, overlap_seconds=0.2, normalize="none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        evaluate(sep, entries, tmp_path / "out", metrics="si_sdr", progress=False)
    named = sorted(str(w.message).rsplit("(mixture ", 1)[1].rstrip(")") for w in caught
                   if "was a guess" in str(w.message))
    assert named == sorted(e.id for e in entries)


def test_cli_records_a_model_config_and_refuses_a_rerun_without_it(dataset, tmp_path, tiny_config, capsys):
    """The same weights file under another architecture is another network: a re-run must not merge them."""
    import torch
    import yaml

    checkpoint = tmp_path / "bare.pt"
    torch.save(mossformer2.build_model(tiny_config).state_dict(), checkpoint)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_config.to_dict()))
    base = ["evaluate", "--data", str(dataset), "--out", str(tmp_path / "o"), "--checkpoint", str(checkpoint),
            "--device", "cpu", "--limit", "1", "--metrics", "si_sdr"]
    assert main([*base, "--model-config", str(tmp_path / "tiny.yaml")]) == 0
    assert json.loads((tmp_path / "o" / "settings.json").read_text())["model_config"] == tiny_config.to_dict()
    capsys.readouterr()
    assert main(base) == 1
    assert "holds results of a run with other settings (model_config" in capsys.readouterr().err


def test_a_row_cut_off_inside_its_error_column_is_scored_again(tmp_path):
    """A crash while writing the last row: its status may already read ok, but the row is not complete."""
    header = csv_header(["si_sdr"])
    path = tmp_path / "per_utterance.csv"
    path.write_text(",".join(header) + "\n" + "m1,1.000,10.0,12.0,0 1,ok,\n" + "m2,1.000,9.0,11.0,1 0,ok,pesq: PES")
    assert [r["id"] for r in _read_previous_rows(path, header)] == ["m1"]


def test_a_csv_with_other_columns_is_refused_not_resumed(tmp_path):
    header = csv_header(["si_sdr"])
    path = tmp_path / "per_utterance.csv"
    path.write_text("id,duration_s,stoi,permutation,status,error\nm1,1.000,0.9,0 1,ok,\n")
    with pytest.raises(ValueError, match="was written with other columns"):
        _read_previous_rows(path, header)


def test_limit_0_is_refused_not_an_empty_run(tmp_path):
    from types import SimpleNamespace

    from mossformer2.evaluation import evaluate

    sep = SimpleNamespace(num_spks=2, separate=lambda wave, rate: None)
    with pytest.raises(ValueError, match="limit must be >= 1, got 0"):
        evaluate(sep, [], tmp_path / "out", metrics="si_sdr", limit=0, progress=False)
    assert not (tmp_path / "out").exists()


def _resumed_with_a_smaller_limit(dataset, out):
    from mossformer2.evaluation import evaluate
    from mossformer2.separation import Separator
    from tests.evaluation.test_evaluate import OracleModel

    sep = Separator(OracleModel(dataset), device="cpu")
    evaluate(sep, dataset, out, metrics="si_sdr", limit=2, progress=False)
    return evaluate(sep, dataset, out, metrics="si_sdr", limit=1, progress=False)


def test_skipped_counts_only_the_mixtures_this_run_covers(dataset, tmp_path):
    """Two rows scored earlier, --limit 1 now: one mixture skipped as already scored, the other not summarised."""
    summary = _resumed_with_a_smaller_limit(dataset, tmp_path / "out")
    assert summary["num_skipped_already_scored"] == 1 and summary["num_csv_rows_not_summarised"] == 1


def test_seconds_evaluated_this_run_leave_out_earlier_rows(dataset, tmp_path):
    summary = _resumed_with_a_smaller_limit(dataset, tmp_path / "out")
    assert summary["seconds_evaluated_this_run"] == 0 and summary["real_time_factor_this_run"] is None


def _fake_separator(dataset):
    from types import SimpleNamespace

    from mossformer2.data.manifests import load_manifest
    from mossformer2.evaluation.evaluate import load_mixture

    refs = {e.id: load_mixture(e)[1] for e in load_manifest(dataset)}
    first = load_manifest(dataset)[0]
    return SimpleNamespace(num_spks=2, separate=lambda wave, rate: refs[first.id])


def test_a_score_that_is_not_finite_fails_its_row(dataset, tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module("mossformer2.evaluation.evaluate")  # (not the function the package exports)

    monkeypatch.setattr(module, "score_separation", lambda *a, **k: {"si_sdr": float("inf"), "si_sdri": 1.0,
                                                                      "permutation": [0, 1], "errors": {}})
    summary = module.evaluate(_fake_separator(dataset), dataset, tmp_path / "out", metrics="si_sdr", limit=1,
                              progress=False)
    assert summary["num_failed"] == 1 and "si_sdr is not finite (inf)" in summary["failed"][0]["error"]


def test_a_missing_package_stops_the_run_instead_of_failing_every_row(dataset, tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module("mossformer2.evaluation.evaluate")  # (not the function the package exports)

    def missing(*_args, **_kwargs):
        raise ImportError("No module named 'pesq'")

    monkeypatch.setattr(module, "score_separation", missing)
    with pytest.raises(ImportError, match="pesq"):
        module.evaluate(_fake_separator(dataset), dataset, tmp_path / "out", metrics="si_sdr", limit=2,
                        progress=False)


def test_an_unreadable_earlier_mixture_keeps_pesq_as_one_mean(dataset, tmp_path):
    """Only narrow band and wide band together are two scales: an earlier mixture whose mode can no longer be read
    ("unknown") stays in the one PESQ mean, without the per-mode warning."""
    import dataclasses
    import shutil
    import warnings

    from mossformer2.data.manifests import load_manifest
    from mossformer2.evaluation import evaluate
    from mossformer2.separation import Separator
    from tests.evaluation.test_evaluate import OracleModel

    copies = []
    for e in load_manifest(dataset)[:2]:
        shutil.copy(e.mix, tmp_path / e.mix.name)
        copies.append(dataclasses.replace(e, mix=tmp_path / e.mix.name))
    sep = Separator(OracleModel(dataset), device="cpu")
    evaluate(sep, copies, tmp_path / "out", metrics="pesq", progress=False)
    copies[0].mix.write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = evaluate(sep, copies, tmp_path / "out", metrics="pesq", progress=False)
    assert list(summary["scores"]) == ["pesq"] and summary["scores"]["pesq"]["count"] == 2

"""`mossformer2 mix` and mossformer2.evaluation.mixing: levels, SIR, layout, determinism, recipes."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mossformer2.cli import main
from mossformer2.data.manifests import load_manifest
from mossformer2.evaluation.mixing import active_level, levels_for_sirs, mix_waves, plan_from_files
from tests.conftest import torch_blocked_env
from tests.test_metrics import speech_like

SR = 16000


def write_speech(path: Path, seed: int, seconds: float, sample_rate: int = SR, f0: float = 150.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = speech_like(np.random.default_rng(seed), seconds, sample_rate, f0)
    sf.write(str(path), wave.astype(np.float32), sample_rate, subtype="PCM_16")
    return path


def make_speaker_folder(root: Path, speakers: int = 3, files: int = 2, sample_rate: int = SR) -> Path:
    for s in range(speakers):
        for k in range(files):
            write_speech(root / f"spk{s}" / f"utt{k}.wav", seed=10 * s + k, seconds=0.8 + 0.2 * k,
                         sample_rate=sample_rate, f0=110.0 + 40 * s)
    return root


def read(path: Path) -> np.ndarray:
    data, rate = sf.read(str(path), dtype="float64")
    assert rate == SR
    return data


def measured_sir_db(s1: np.ndarray, s2: np.ndarray) -> float:
    return 20 * np.log10(active_level(s1, SR) / active_level(s2, SR))


def metadata_rows(out: Path) -> list[dict[str, str]]:
    with (out / "metadata.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_active_level_is_rms_of_active_speech_and_scales_linearly():
    t = np.arange(SR) / SR
    tone = 0.5 * np.sin(2 * np.pi * 220 * t)
    assert active_level(tone, SR) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)
    padded = np.concatenate([np.zeros(3 * SR), tone, np.zeros(3 * SR)])
    # silence hardly dilutes the active level (the plain RMS drops by 8.5 dB here; the 200 ms hangover and the
    # envelope's decay count about 0.3 s of the silence as active, about -1.2 dB)
    assert 20 * np.log10(active_level(padded, SR) / active_level(tone, SR)) == pytest.approx(-1.2, abs=0.4)
    assert active_level(7 * padded, SR) == pytest.approx(7 * active_level(padded, SR), rel=1e-9)
    with pytest.raises(ValueError, match="silent"):
        active_level(np.zeros(SR), SR)


def test_active_level_does_not_depend_on_the_pauses():
    """P.56's point: pauses longer than the hangover leave the active level alone, while the plain RMS falls with
    the duty cycle. Bursts of 0.5 s with 1.5 s or 3.5 s of silence between them: the RMS differs by
    10 log10(4 / 2) = 3 dB, the active level by under 0.1 dB (so mixing two talkers with different pause habits
    by active level gives the SIR asked for; by RMS it would be 3 dB off)."""
    t = np.arange(SR // 2) / SR
    burst = 0.3 * np.sin(2 * np.pi * 180 * t) * np.hanning(t.size) ** 0.1

    def talker(gap_seconds: float) -> np.ndarray:
        gap = np.zeros(int(gap_seconds * SR))
        return np.concatenate([np.concatenate([gap, burst]) for _ in range(4)] + [gap])

    dense, sparse = talker(1.5), talker(3.5)
    rms = [np.sqrt(np.mean(x**2)) for x in (dense, sparse)]
    assert 20 * np.log10(rms[0] / rms[1]) == pytest.approx(10 * np.log10((3.5 + 0.5) / (1.5 + 0.5)), abs=0.2)
    assert 20 * np.log10(active_level(dense, SR) / active_level(sparse, SR)) == pytest.approx(0.0, abs=0.1)


def test_levels_and_mix_waves_give_requested_sir_and_avoid_clipping():
    assert levels_for_sirs([6.0]) == [3.0, -3.0]
    rng = np.random.default_rng(0)
    a, b = speech_like(rng, 1.0, SR, 120.0), speech_like(rng, 1.5, SR, 200.0)
    mix, sources, gains, starts = mix_waves([10 * a, b], levels_for_sirs([6.0]), SR, mode="min")
    assert sources.shape == (2, SR) and starts == [0, 0]
    np.testing.assert_allclose(mix, sources.sum(0), atol=1e-12)
    assert measured_sir_db(sources[0], sources[1]) == pytest.approx(6.0, abs=1e-6)
    # unit active level has peaks far above 1: the common rescale brings the largest to exactly 0.9
    assert max(np.abs(mix).max(), np.abs(sources).max()) == pytest.approx(0.9)
    np.testing.assert_allclose(sources[0], gains[0] * 10 * a, atol=1e-12)
    mix_max, sources_max, _, _ = mix_waves([a, b], [0.0, 0.0], SR, mode="max", start_fractions=[0.5, 0.5])
    assert mix_max.shape == (int(1.5 * SR),)
    assert not sources_max[0, SR:].any()  # the shorter source is zero-padded at the end
    # The SIR holds in the written (padded) files when the shorter source talks to its last sample: measured
    # before padding, P.56's hang-over into the zeros put it 0.9 dB off.
    talking = rng.standard_normal(SR // 2) * 0.1
    _, padded, _, _ = mix_waves([b, talking], levels_for_sirs([4.0]), SR, mode="max")
    assert measured_sir_db(padded[0], padded[1]) == pytest.approx(4.0, abs=1e-6)
    _, _, _, crop_starts = mix_waves([a, b], [0.0, 0.0], SR, mode="min", start_fractions=[0.5, 0.5])
    assert crop_starts == [0, int(0.5 * 0.5 * SR)]  # only the longer source is cropped, where asked
    with pytest.raises(ValueError, match="mode"):
        mix_waves([a, b], [0.0, 0.0], SR, mode="avg")
    # Quiet levels are brought up to 0.9 as well, as the scripts do (0.9 / max(1, peak) left them quiet).
    quiet_mix, quiet_sources, _, _ = mix_waves([a, b], [-30.0, -30.0], SR, mode="min")
    assert max(np.abs(quiet_mix).max(), np.abs(quiet_sources).max()) == pytest.approx(0.9)


def test_mix_two_files_at_sir_with_resampling_reads_back(tmp_path):
    f1 = write_speech(tmp_path / "in" / "alice.wav", seed=1, seconds=1.0, f0=120.0)
    f2 = write_speech(tmp_path / "in" / "bob.flac", seed=2, seconds=1.4, sample_rate=8000, f0=220.0)
    out = tmp_path / "out"
    assert main(["mix", str(f1), str(f2), "-o", str(out), "--sir", "6", "--subtype", "FLOAT"]) == 0
    (entry,) = load_manifest(out)
    (from_csv,) = load_manifest(out / "metadata.csv")
    assert entry.id == from_csv.id == "alice_3_bob_-3"
    assert from_csv.mix == entry.mix and from_csv.sources == entry.sources
    mix, s1, s2 = read(entry.mix), read(entry.sources[0]), read(entry.sources[1])
    assert mix.shape == s1.shape == s2.shape == (SR,)  # min mode, bob resampled 8 -> 16 kHz
    np.testing.assert_allclose(mix, s1 + s2, atol=1e-6)
    assert measured_sir_db(s1, s2) == pytest.approx(6.0, abs=0.01)
    (row,) = metadata_rows(out)
    assert row["source_2_file"] == str(f2.resolve()) and float(row["sir_db"]) == pytest.approx(6.0)
    assert int(row["length"]) == SR
    np.testing.assert_allclose(s1, float(row["source_1_gain"]) * read(f1), atol=1e-6)
    # existing output is never replaced silently
    assert main(["mix", str(f1), str(f2), "-o", str(out)]) == 1
    assert main(["mix", str(f1), str(f2), "-o", str(out), "--overwrite", "--mode", "max"]) == 0
    assert read(load_manifest(out)[0].mix).shape == (int(1.4 * SR),)
    # one recording as both speakers (also through another spelling of its path): refused, it was mixed
    twice = str(tmp_path / "in" / ".." / "in" / "alice.wav")
    with pytest.raises(ValueError, match=r"alice.wav is named twice \(as .*alice.wav before\)"):
        plan_from_files([f1, twice])


def test_mix_speaker_folder_is_seeded_and_uses_different_speakers(tmp_path, capsys):
    root = make_speaker_folder(tmp_path / "speakers", speakers=3, files=2, sample_rate=22050)
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / name
        assert main(["mix", str(root), "-o", str(out), "--num-mixtures", "5", "--seed", str(seed),
                     "--sir-range", "-5", "5"]) == 0
        assert "\r" not in capsys.readouterr().err  # no progress bar into a stderr that is not a terminal
        runs[name] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert len(runs["a"]) == 5 * 3 + 1  # mix, s1, s2 per mixture + metadata.csv
    assert runs["a"] == runs["b"]  # same seed, byte-identical outputs
    assert runs["a"] != runs["c"]
    rows = metadata_rows(tmp_path / "a")
    sirs = [float(r["sir_db"]) for r in rows]
    assert all(-5 <= s <= 5 for s in sirs) and len(set(sirs)) == 5
    for row in rows:
        speakers = {Path(row["source_1_file"]).parent.name, Path(row["source_2_file"]).parent.name}
        assert len(speakers) == 2
        s1 = read(tmp_path / "a" / row["source_1_path"])
        s2 = read(tmp_path / "a" / row["source_2_path"])
        assert measured_sir_db(s1, s2) == pytest.approx(float(row["sir_db"]), abs=0.05)  # PCM_16 rounding
    assert len(load_manifest(tmp_path / "a" / "metadata.csv", num_spks=2)) == 5


def test_mix_three_speakers_from_folder(tmp_path):
    root = make_speaker_folder(tmp_path / "speakers", speakers=3, files=1)
    out = tmp_path / "out"
    assert main(["mix", str(root), "-o", str(out), "--num-mixtures", "2", "--num-spks", "3"]) == 0
    entries = load_manifest(out, num_spks=3)
    assert len(entries) == 2
    for row in metadata_rows(out):  # s1 over s2 and over s3, each drawn from --sir-range
        levels = [float(row[f"source_{k}_level_db"]) for k in (1, 2, 3)]
        assert float(row["sir_db"]) == pytest.approx(levels[0] - levels[1], abs=1e-4)
        assert float(row["sir_db_s3"]) == pytest.approx(levels[0] - levels[2], abs=1e-4)
    mix = read(entries[0].mix)
    total = sum(read(p) for p in entries[0].sources)
    assert np.abs(mix - total).max() < 3 * 2**-15  # PCM_16 rounding of four files
    assert main(["mix", str(root), "-o", str(tmp_path / "o4"), "--num-mixtures", "1", "--num-spks", "4"]) == 1


def test_mix_recipe_like_wsj0_2mix(tmp_path):
    wsj = tmp_path / "wsj0"
    write_speech(wsj / "si_tr_s" / "011" / "011a0101.wav", seed=5, seconds=1.2, f0=110.0)
    write_speech(wsj / "si_tr_s" / "401" / "401o030t.wav", seed=6, seconds=1.0, f0=230.0)
    recipe = tmp_path / "mix_2_spk_tt.txt"
    recipe.write_text("si_tr_s/011/011a0101.wv1 1.5 si_tr_s/401/401o030t.wv1 -1.5\n\n")
    out = tmp_path / "out"
    assert main(["mix", "--recipe", str(recipe), "--wsj-root", str(wsj), "-o", str(out)]) == 0
    (entry,) = load_manifest(out)
    assert entry.id == "011a0101_1.5_401o030t_-1.5"  # the wsj0-2mix naming
    s1, s2 = read(entry.sources[0]), read(entry.sources[1])
    assert s1.shape == (SR,)
    # as create_wav_2speakers.m: levels measured on the whole files, then the list's dB values, then the cut
    file1, file2 = read(wsj / "si_tr_s/011/011a0101.wav"), read(wsj / "si_tr_s/401/401o030t.wav")
    gain1, gain2 = (float(r) for r in (metadata_rows(out)[0][f"source_{k}_gain"] for k in (1, 2)))
    assert gain1 / gain2 == pytest.approx(10 ** (3.0 / 20) * active_level(file2, SR) / active_level(file1, SR),
                                          rel=1e-6)
    np.testing.assert_allclose(s1, gain1 * file1[:SR], atol=2**-15)
    np.testing.assert_allclose(s2, gain2 * file2[:SR], atol=2**-15)
    recipe.write_text("si_tr_s/011/011a0101.wv1 1.5 si_tr_s/401/401o030t.wv1\n")
    assert main(["mix", "--recipe", str(recipe), "--wsj-root", str(wsj), "-o", str(tmp_path / "x")]) == 1
    recipe.write_text("si_tr_s/011/011a0101.wv1 1.5 si_tr_s/401/missing.wv1 -1.5\n")
    with pytest.raises(FileNotFoundError, match="line 1: source file not found"):
        main(["-v", "mix", "--recipe", str(recipe), "--wsj-root", str(wsj), "-o", str(tmp_path / "x")])
    # The SIR of a line is checked as --sir is (each level alone passed 40 and -40: 80 dB).
    recipe.write_text("si_tr_s/011/011a0101.wv1 40 si_tr_s/401/401o030t.wv1 -40\n")
    with pytest.raises(ValueError, match="line 1: the SIR of s1 over another source must be a number of dB from -60"):
        main(["-v", "mix", "--recipe", str(recipe), "--wsj-root", str(wsj), "-o", str(tmp_path / "x")])
    recipe.write_text("si_tr_s/011/011a0101.wv1 nan si_tr_s/401/401o030t.wv1 0\n")
    with pytest.raises(ValueError, match="line 1: 'nan' is not a finite dB value"):
        main(["-v", "mix", "--recipe", str(recipe), "--wsj-root", str(wsj), "-o", str(tmp_path / "x")])


def test_mix_reports_bad_requests(tmp_path, capsys):
    root = make_speaker_folder(tmp_path / "speakers", speakers=1, files=2)
    assert main(["mix", str(root), "-o", str(tmp_path / "o"), "--num-mixtures", "2"]) == 1
    assert "1 speaker folder(s)" in capsys.readouterr().err
    assert main(["mix", str(root), "-o", str(tmp_path / "o")]) == 1
    assert "--num-mixtures" in capsys.readouterr().err
    assert main(["mix", str(tmp_path / "nope.wav"), str(tmp_path / "nope2.wav"), "-o", str(tmp_path / "o")]) == 1
    assert "no such audio file" in capsys.readouterr().err
    # one speaker's folder instead of the folder of speaker folders; a file and a folder together
    assert main(["mix", str(root / "spk0"), "-o", str(tmp_path / "o"), "--num-mixtures", "2"]) == 1
    assert f"{root / 'spk0'} holds audio files itself, so it looks like one speaker's folder" in (
        capsys.readouterr().err)
    assert main(["mix", str(root / "spk0" / "utt0.wav"), str(root), "-o", str(tmp_path / "o")]) == 1
    assert f"{root} is a folder: give two or more audio files, or one folder" in capsys.readouterr().err
    # one misspelt path; one file alone
    assert main(["mix", str(tmp_path / "speakerz"), "-o", str(tmp_path / "o"), "--num-mixtures", "2"]) == 1
    assert f"no such file or folder: {tmp_path / 'speakerz'}" in capsys.readouterr().err
    assert main(["mix", str(root / "spk0" / "utt0.wav"), "-o", str(tmp_path / "o")]) == 1
    assert "is one file: give two or more audio files" in capsys.readouterr().err
    # an option of another mode is refused, not ignored
    files = [str(root / "spk0" / "utt0.wav"), str(root / "spk0" / "utt1.wav")]
    assert main(["mix", *files, "-o", str(tmp_path / "o"), "--seed", "3", "--num-mixtures", "5"]) == 1
    assert "--num-mixtures, --seed: not used in files mode" in capsys.readouterr().err
    assert main(["mix", str(root), "-o", str(tmp_path / "o"), "--num-mixtures", "2", "--sir", "3"]) == 1
    assert "--sir: not used in folder mode (use --sir-range)" in capsys.readouterr().err
    assert main(["mix", *files, "-o", str(tmp_path / "o"), "--sample-rate", "16"]) == 1  # files `separate` refuses
    assert "--sample-rate must be 1000 to 768000 Hz, got 16" in capsys.readouterr().err
    # SIRs: 1e6 dB and NaN ended in an OverflowError traceback, inf / NaN in "the mixture is silent"
    for sir in ("1e6", "nan", "inf", "-61"):
        assert main(["mix", *files, "-o", str(tmp_path / "o"), "--sir", sir]) == 1
        assert "sir_db (--sir) must be a number of dB from -60 to 60" in capsys.readouterr().err
    assert main(["mix", str(root), "-o", str(tmp_path / "o"), "--num-mixtures", "2", "--sir-range", "nan", "5"]) == 1
    assert "sir_range (--sir-range) must be a number of dB from -60 to 60" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    silent = tmp_path / "silent.wav"
    sf.write(str(silent), np.zeros(SR, dtype=np.float32), SR)
    speech = write_speech(tmp_path / "speech.wav", seed=0, seconds=1.0)
    assert main(["mix", str(speech), str(silent), "-o", str(tmp_path / "s")]) == 1
    assert "silent" in capsys.readouterr().err
    assert not (tmp_path / "s" / "metadata.csv").exists()


def test_a_set_of_mixtures_inside_the_speaker_folder_is_never_taken_as_a_speaker(tmp_path, capsys):
    """`mix ROOT -o ROOT/testset` is refused (its mixtures would be one more "speaker" next time), and a mixture
    set found among the speaker folders is refused by `mix` and by dynamic mixing alike."""
    from mossformer2.data.dynamic_mixing import load_utterances

    root = make_speaker_folder(tmp_path / "speakers", speakers=3, files=1)
    assert main(["mix", str(root), "-o", str(root / "testset"), "--num-mixtures", "2"]) == 1
    assert "lies inside the speaker folder" in capsys.readouterr().err
    assert not (root / "testset").exists()
    assert main(["mix", str(root), "-o", str(root / ".sets" / "a"), "--num-mixtures", "2"]) == 0  # hidden: skipped
    assert main(["mix", str(root), "-o", str(tmp_path / "b"), "--num-mixtures", "2"]) == 0
    assert main(["mix", str(root), "-o", str(tmp_path / "testset"), "--num-mixtures", "2"]) == 0
    (tmp_path / "testset").rename(root / "testset")  # moved in by hand
    assert main(["mix", str(root), "-o", str(tmp_path / "again"), "--num-mixtures", "2"]) == 1
    assert f"{root / 'testset'} holds a set of mixtures (mix/, s1/, ...), not a speaker's" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds a set of mixtures"):
        load_utterances(root)
    (root / "testset").rename(root / "spk0" / "old")  # deeper down: found too (a speaker's audio is searched there)
    with pytest.raises(ValueError, match=f"{root / 'spk0' / 'old'} holds a set of mixtures"):
        load_utterances(root)
    # The set itself named as the speaker folder: mix/, s1/, s2/ were taken as three speakers.
    assert main(["mix", str(tmp_path / "b"), "-o", str(tmp_path / "c"), "--num-mixtures", "2"]) == 1
    assert f"{tmp_path / 'b'} is a set of mixtures (mix/, s1/, ...), not a folder of speaker" in (
        capsys.readouterr().err)
    with pytest.raises(ValueError, match="is a set of mixtures"):
        load_utterances(tmp_path / "b")
    for folder in ("mix", "s1", "s2"):  # a LibriMix split: mix_clean/ beside s1/, s2/
        (tmp_path / "b" / folder).rename(tmp_path / "b" / ("mix_clean" if folder == "mix" else folder))
    with pytest.raises(ValueError, match="is a set of mixtures"):
        load_utterances(tmp_path / "b")


def test_mix_names_clashing_mixtures_and_notes_resampling(tmp_path, capsys):
    wsj = tmp_path / "wsj"
    for folder, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 4)):
        write_speech(wsj / folder / ("u0.wav" if folder in "ac" else "u1.wav"), seed=seed, seconds=1.0,
                     sample_rate=8000)
    recipe = tmp_path / "recipe.txt"
    recipe.write_text("a/u0.wav 0 b/u1.wav 0\nc/u0.wav 0 d/u1.wav 0\n")
    assert main(["mix", "--recipe", str(recipe), "--wsj-root", str(wsj), "-o", str(tmp_path / "o")]) == 1
    assert "mixtures 1 and 2 (in the order given) would get the same name 'u0_0_u1_0'" in capsys.readouterr().err
    recipe.write_text("a/u0.wav 0 b/u1.wav 0\n")
    assert main(["mix", "--recipe", str(recipe), "--wsj-root", str(wsj), "-o", str(tmp_path / "o")]) == 0
    assert "sources at 8000 Hz were resampled to 16000 Hz (--sample-rate)" in capsys.readouterr().err
    assert main(["mix", "--recipe", str(recipe), "--wsj-root", str(wsj), "-o", str(tmp_path / "p"),
                 "--sample-rate", "8000"]) == 0
    assert "resampled" not in capsys.readouterr().err


def test_overwrite_leaves_no_stale_mixtures_and_a_failed_run_leaves_no_files(tmp_path):
    from mossformer2.evaluation.mixing import MixtureSpec, create_mixtures

    root = make_speaker_folder(tmp_path / "speakers", speakers=3, files=1)
    out = tmp_path / "out"
    assert main(["mix", str(root), "-o", str(out), "--num-mixtures", "4", "--seed", "1"]) == 0
    assert main(["mix", str(root), "-o", str(out), "--num-mixtures", "2", "--seed", "2", "--overwrite"]) == 0
    assert len(load_manifest(out)) == len(load_manifest(out / "metadata.csv")) == 2  # the folder: 2, not 6
    assert len([p for p in out.rglob("*") if p.is_file()]) == 2 * 3 + 1
    silent = tmp_path / "silent.wav"
    sf.write(str(silent), np.zeros(SR, dtype=np.float32), SR)
    speech = sorted(root.rglob("*.wav"))
    specs = [MixtureSpec("good", speech[:2], [0.0, 0.0]), MixtureSpec("bad", [speech[2], silent], [0.0, 0.0])]
    with pytest.raises(ValueError, match="mixture bad .* silent"):
        create_mixtures(specs, tmp_path / "failed", progress=False)
    with pytest.raises(ValueError, match="mixture bad .* silent"):
        create_mixtures(specs, tmp_path / "failed" / "deeper", progress=False)
    assert not (tmp_path / "failed").exists()  # "good" removed again, and the folders the run made
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("the user's")
    with pytest.raises(ValueError, match="mixture bad .* silent"):
        create_mixtures(specs, tmp_path / "kept", progress=False)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]  # a folder that was there stays


def test_sir_0_names_have_no_negative_zero(tmp_path):
    f1 = write_speech(tmp_path / "in" / "alice.wav", seed=1, seconds=0.5)
    f2 = write_speech(tmp_path / "in" / "bob.wav", seed=2, seconds=0.5)
    assert main(["mix", str(f1), str(f2), "-o", str(tmp_path / "pair"), "--sir", "0"]) == 0
    (row,) = metadata_rows(tmp_path / "pair")
    assert row["mixture_ID"] == "alice_0_bob_0" and (tmp_path / "pair" / "mix" / "alice_0_bob_0.wav").is_file()
    assert row["source_1_level_db"] == row["source_2_level_db"] == row["sir_db"] == "0"
    root = make_speaker_folder(tmp_path / "speakers", speakers=3, files=1)
    assert main(["mix", str(root), "-o", str(tmp_path / "folder"), "--num-mixtures", "2", "--num-spks", "3",
                 "--sir-range", "0", "0"]) == 0
    names = [r["mixture_ID"] for r in metadata_rows(tmp_path / "folder")]
    assert len(names) == 2 and all("-0" not in n and n.endswith("_0") for n in names), names


def test_speaker_folders_skip_hidden_names(tmp_path):
    """A folder copied from macOS holds `._x.wav` AppleDouble sidecars: not audio, and they failed the run."""
    from mossformer2.evaluation.mixing import speaker_files

    root = make_speaker_folder(tmp_path / "speakers", speakers=2, files=1)
    alice = sorted(root.iterdir())[0]
    (alice / "._a.wav").write_bytes(b"\x00\x05\x16\x07 not audio")
    (root / ".cache").mkdir()
    write_speech(root / ".cache" / "x.wav", seed=3, seconds=0.5)
    table = speaker_files(root)
    assert sorted(table) == sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    assert all(not f.name.startswith(".") for files in table.values() for f in files)


def test_mix_writes_at_the_requested_sample_rate(tmp_path):
    f1 = write_speech(tmp_path / "in" / "a.wav", seed=1, seconds=1.0)
    f2 = write_speech(tmp_path / "in" / "b.wav", seed=2, seconds=1.0, f0=220.0)
    out = tmp_path / "out"
    assert main(["mix", str(f1), str(f2), "-o", str(out), "--sample-rate", "8000"]) == 0
    (entry,) = load_manifest(out)
    for path in (entry.mix, *entry.sources):
        info = sf.info(str(path))
        assert info.samplerate == 8000 and info.frames == 8000  # 1 s of 16 kHz input, resampled


def test_a_killed_run_is_noticed_and_overwrite_removes_its_files(tmp_path, capsys):
    """SIGKILL (OOM, a lost machine) in the middle of a set: its files were left without metadata.csv, and the
    next run wrote its own set beside them, so `evaluate --data OUT` scored both."""
    root = make_speaker_folder(tmp_path / "speakers", speakers=3, files=1)
    out = tmp_path / "out"
    script = f"""
import os, signal
import mossformer2.evaluation.mixing as mixing
from mossformer2.cli import main
real_write, count = mixing.write_audio, [0]
def write_then_die(path, *args, **kwargs):
    count[0] += 1
    if count[0] == 5:  # killed while writing the 5th file: its temp file stays behind
        (path.parent / f".{{path.stem}}.abcd_123.tmp.wav").write_bytes(b"RIFF")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(path, *args, **kwargs)
mixing.write_audio = write_then_die
main(["mix", {str(root)!r}, "-o", {str(out)!r}, "--num-mixtures", "3", "--seed", "1"])
"""
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len([p for p in left if not p.name.startswith(".")]) == 4 and Path("metadata.csv") not in left
    assert main(["mix", str(root), "-o", str(out), "--num-mixtures", "2", "--seed", "5"]) == 1
    assert "holds the files of a `mix` run that did not finish" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is a set that `mossformer2 mix` did not finish"):
        load_manifest(out)  # evaluate and train scored and trained on what a killed run left, as if whole
    assert main(["mix", str(root), "-o", str(out), "--num-mixtures", "2", "--seed", "5", "--overwrite"]) == 0
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len(files) == 2 * 3 + 1 and not [p for p in files if p.name.startswith(".")], files
    assert len(load_manifest(out)) == 2


def test_audio_files_no_set_lists_are_never_mixed_with_a_new_set(tmp_path, capsys):
    """Files in mix/ that no metadata.csv lists (a user's, or a killed run of an older version): the folder
    loader would read them as mixtures of the new set. --overwrite removes only files of ours, so it refuses too;
    a stale temp file of ours is removed."""
    root = make_speaker_folder(tmp_path / "speakers", speakers=3, files=1)
    out = tmp_path / "out"
    stray = write_speech(out / "mix" / "mine.wav", seed=9, seconds=0.3)
    (out / "s1").mkdir()
    stale_temp = out / "s1" / ".0_x.k2j4_9ab.tmp.wav"
    stale_temp.write_bytes(b"RIFF")
    for extra in ([], ["--overwrite"]):
        assert main(["mix", str(root), "-o", str(out), "--num-mixtures", "2", *extra]) == 1
        assert "holds 1 audio file(s) that no metadata.csv lists and this set does not write (mix/mine.wav)" in (
            capsys.readouterr().err)
    assert stray.is_file() and not (out / "metadata.csv").exists()
    stray.unlink()
    assert main(["mix", str(root), "-o", str(out), "--num-mixtures", "2"]) == 0
    assert not stale_temp.exists() and not (out / ".mix_unfinished.txt").exists()


def test_mix_runs_without_torch(tmp_path):
    """The README's torch-less deployment: mixing is NumPy only (mix imported torch through the metrics)."""
    f1 = write_speech(tmp_path / "a.wav", seed=1, seconds=0.5)
    f2 = write_speech(tmp_path / "b.wav", seed=2, seconds=0.5, f0=220.0)
    script = (f"import sys\nfrom mossformer2.cli import main\n"
              f"print(main(['mix', {str(f1)!r}, {str(f2)!r}, '-o', {str(tmp_path / 'pair')!r}]), "
              "'torch' in sys.modules)\n")
    env = torch_blocked_env(tmp_path)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert out.stdout.split()[-2:] == ["0", "False"], out.stderr
    assert len(load_manifest(tmp_path / "pair")) == 1


def _noise(n, seed):
    return np.random.default_rng(seed).standard_normal(n) * 0.1


def test_a_cropped_source_starts_at_the_floor_of_its_fraction():
    """start = floor(fraction * (len_k - mix_len)), as MixtureSpec documents: 0.55 * 10 samples -> 5, not 6."""
    _, _, _, starts = mix_waves([_noise(16010, 1), _noise(16000, 2)], [0.0, 0.0], 16000,
                                start_fractions=[0.55, 0.3])
    assert starts == [5, 0]


def test_sources_that_cancel_in_the_mix_are_still_kept_below_full_scale():
    """The common rescale takes the peak of the sources too: two nearly opposite sources make a quiet mixture,
    and scaling by the mixture's peak alone would push the sources far past full scale."""
    from mossformer2.evaluation.mixing import PEAK_LIMIT

    n = _noise(16000, 3)
    mix, sources, _, _ = mix_waves([n, -n + 0.05 * _noise(16000, 4)], [0.0, 0.0], 16000)
    assert np.abs(sources).max() == pytest.approx(PEAK_LIMIT)
    assert np.abs(mix).max() < 0.5 * PEAK_LIMIT
    np.testing.assert_allclose(mix, sources.sum(0), atol=1e-12)


def test_the_documented_sir_limits_themselves_are_accepted():
    from mossformer2.evaluation.mixing import MAX_SIR_DB, check_sir

    assert check_sir(MAX_SIR_DB, "sir") == 60.0 and check_sir(-MAX_SIR_DB, "sir") == -60.0
    with pytest.raises(ValueError, match="from -60 to 60"):
        check_sir(60.5, "sir")


def test_load_mixture_averages_a_multichannel_mixture_to_mono(tmp_path):
    """The public load_mixture (as evaluate) averages the channels, not takes the first."""
    from mossformer2.data.manifests import MixtureEntry
    from mossformer2.evaluation import load_mixture

    left, right = _noise(8000, 5), _noise(8000, 6)
    sf.write(str(tmp_path / "mix.wav"), np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    for k, wave in ((1, left), (2, right)):
        sf.write(str(tmp_path / f"s{k}.wav"), wave, 16000, subtype="FLOAT")
    mix, refs, rate = load_mixture(MixtureEntry("m", tmp_path / "mix.wav", [tmp_path / "s1.wav", tmp_path / "s2.wav"]))
    assert rate == 16000 and refs.shape == (2, 8000)
    np.testing.assert_allclose(mix, (left + right) / 2, atol=1e-6)


def test_overwrite_never_deletes_audio_outside_the_output_folder_that_a_metadata_csv_names(tmp_path):
    """A metadata.csv in the output folder may name files elsewhere (LibriMix-style lists of originals): replacing
    the set removes only the files inside the output folder."""
    from mossformer2.evaluation.mixing import create_mixtures

    a, b = write_speech(tmp_path / "a.wav", 1, 1.0), write_speech(tmp_path / "b.wav", 2, 1.0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metadata.csv").write_text(f"mixture_ID,mixture_path,source_1_path,source_2_path\nx,{a},{a},{b}\n")
    create_mixtures(plan_from_files([a, b]), out, overwrite=True, progress=False)
    assert a.is_file() and b.is_file()

"""Pure parts of recipes/offline_speech/prepare.py: evaluation-package guard, speaker split, audio steps."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import load_script

prepare = load_script("recipes/offline_speech/prepare.py", "offline_speech_prepare")


@pytest.mark.parametrize(
    "name",
    [
        "asterisk-core-sounds-en",
        "asterisk-core-sounds-en-gsm",
        "Asterisk-Core-Sounds-FR-wav",
        "asterisk-core-sounds-es=1.6.1-1",
        "asterisk-core-sounds-it:all",
        "/tmp/debs/asterisk-core-sounds-ru-g722_1.6.1-1_all.deb",
    ],
)
def test_guard_refuses_evaluation_packages(name):
    with pytest.raises(ValueError, match="reserved for\\s+independent evaluation"):
        prepare.check_package_allowed(name)


def test_guard_allows_training_packages_and_normalises_names():
    assert prepare.check_package_allowed("asterisk-prompt-fr-armelle") == "asterisk-prompt-fr-armelle"
    assert prepare.check_package_allowed("ktuberling-data=4:22.12.3-1") == "ktuberling-data"
    assert prepare.check_package_allowed("debs/klettres-data_4%3a22.12.3-1_all.deb") == "klettres-data"
    assert prepare.check_package_allowed("ktuberling-data/bookworm") == "ktuberling-data"  # apt's name/release
    assert prepare.check_package_allowed("gcin-voice:all/stable") == "gcin-voice"
    assert not any(prepare.RESERVED_PACKAGE_PREFIX in name for name in prepare.PACKAGES)


@pytest.mark.parametrize(
    "name",
    [
        "asterisk-core-sounds-en-wav/bookworm",  # name/release: the name, not the release, is checked
        "asterisk-core-sounds-en/..",
        "x/asterisk-core-sounds-en-wav_1.6_all.deb.bak",
        "asterisk-core-sounds-en\u200b",
    ],
)
def test_guard_refuses_reserved_names_in_any_apt_spelling(name):
    with pytest.raises(ValueError, match="reserved for\\s+independent evaluation"):
        prepare.check_package_allowed(name)


@pytest.mark.parametrize(
    "name",
    [
        # apt globs and patterns resolve to reserved packages without spelling their name
        "asterisk-core-sound?-en-wav",
        "asterisk-core-*",
        "asterisk-core-sound[s]-en-wav",
        "asterisk-[cp]*-e[ns]*",
        "?name(asterisk-core-.*)",
        "~nasterisk-core",
        # look-alike letters, whitespace, options, empty
        "\u0430sterisk-core-sound-en",
        "\uff41sterisk-core-sound-en",
        "asterisk\u2010core",
        "ktuberling data",
        " ktuberling-data",
        "-oDebug::NoLocking=1",
        "",
        "x",
    ],
)
def test_guard_refuses_anything_but_a_plain_package_name(name):
    with pytest.raises(ValueError, match="not a plain Debian package name"):
        prepare.check_package_allowed(name)


def _fake_apt(tmp_path: Path, monkeypatch) -> Path:
    """An apt-get on PATH that only records its arguments (nothing is downloaded)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 100\n')
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def test_fetch_passes_only_validated_names_to_apt(tmp_path, monkeypatch):
    log = _fake_apt(tmp_path, monkeypatch)
    for name in ("asterisk-core-sound?-en-wav", "asterisk-core-*", "asterisk-core-sound[s]-en-wav"):
        with pytest.raises(ValueError, match="not a plain Debian package name"):
            prepare.fetch_package(name, tmp_path / "cache")
    assert not log.exists()  # apt never ran
    with pytest.raises(ValueError, match="apt-get download ktuberling-data failed"):
        prepare.fetch_package("ktuberling-data=4:22.12.3-1", tmp_path / "cache")
    assert log.read_text() == "download -- ktuberling-data\n"


def _build_deb(path: Path, package: str, version: str) -> None:
    """A minimal local .deb (no download) with one file, whose Package field may differ from its file name."""
    tree = path.parent / f"tree-{path.name}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: x <x@x>\nDescription: test\n"
    )
    (tree / "usr/share/doc" / package).mkdir(parents=True)
    (tree / "usr/share/doc" / package / "copyright").write_text("License: GPL-2+\n")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(path)], check=True, capture_output=True)
    shutil.rmtree(tree)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_fetch_checks_the_package_field_of_every_cached_deb(tmp_path, monkeypatch):
    log = _fake_apt(tmp_path, monkeypatch)
    debs = tmp_path / "cache/debs"
    debs.mkdir(parents=True)
    # A renamed .deb of another package: it would be credited (LICENSES.md) as the package asked for.
    _build_deb(debs / "ktuberling-data_9_all.deb", "some-other-package", "9")
    with pytest.raises(ValueError, match="holds package 'some-other-package', not 'ktuberling-data'"):
        prepare.fetch_package("ktuberling-data", tmp_path / "cache")
    # A reserved package under a training package's file name is refused even when it is not the newest file.
    (debs / "ktuberling-data_9_all.deb").unlink()
    _build_deb(debs / "ktuberling-data_1_all.deb", "asterisk-core-sounds-en-wav", "1")
    _build_deb(debs / "ktuberling-data_2_all.deb", "ktuberling-data", "2")
    with pytest.raises(ValueError, match="reserved"):
        prepare.fetch_package("ktuberling-data", tmp_path / "cache")
    assert not (tmp_path / "cache/unpacked").exists()
    assert not log.exists()  # the cache was used: apt never ran


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_fetch_unpacks_the_named_package_and_reports_the_unpacked_version(tmp_path, monkeypatch):
    _fake_apt(tmp_path, monkeypatch)
    debs = tmp_path / "cache/debs"
    debs.mkdir(parents=True)
    _build_deb(debs / "ktuberling-data_1_all.deb", "ktuberling-data", "1")
    _build_deb(debs / "ktuberling-data-extra_1_all.deb", "ktuberling-data-extra", "1")  # another package: ignored
    root, version = prepare.fetch_package("ktuberling-data", tmp_path / "cache")
    assert version == "1" and (root / "usr/share/doc/ktuberling-data/copyright").is_file()
    # A newer .deb joining the cache does not change what was unpacked, so the version stays that of the files.
    _build_deb(debs / "ktuberling-data_2_all.deb", "ktuberling-data", "2")
    assert prepare.fetch_package("ktuberling-data", tmp_path / "cache") == (root, "1")


def test_guard_refuses_files_and_cli_packages_before_any_download(tmp_path, capsys):
    with pytest.raises(ValueError, match="reserved"):
        prepare.decode_audio(tmp_path / "unpacked/asterisk-core-sounds-en/usr/share/asterisk/sounds/en/1.gsm")
    # The CLI must refuse before touching apt (the cache folder stays empty).
    cache = tmp_path / "cache"
    code = prepare.main(
        [
            "--out",
            str(tmp_path / "out"),
            "--cache",
            str(cache),
            "--no-synthetic",
            "--packages",
            "ktuberling-data",
            "asterisk-core-sounds-en-wav",
        ]
    )
    assert code == 1
    assert "reserved for independent evaluation" in capsys.readouterr().err
    assert not cache.exists()


def _speakers(n_per_family: dict[str, int], ties: dict[str, str] | None = None):
    ties = ties or {}
    infos = []
    for family, n in n_per_family.items():
        for i in range(n):
            name = f"{family}-{i}"
            infos.append(prepare.SpeakerInfo(name, family, ties.get(name, name)))
    return infos


def test_split_holds_out_whole_speakers_with_no_overlap():
    infos = _speakers({"tuxpaint": 10, "kde": 20, "fillets": 4, "asterisk": 3})
    assignment = prepare.split_speakers(infos, valid_fraction=0.12, test_fraction=0.12, seed=3)
    assert set(assignment) == {i.name for i in infos}  # every speaker exactly once
    splits = {s: {n for n, v in assignment.items() if v == s} for s in prepare.SPLITS}
    assert not (
        splits["train"] & splits["valid"] or splits["train"] & splits["test"] or splits["valid"] & splits["test"]
    )
    assert len(splits["test"]) == round(37 * 0.12) and len(splits["valid"]) == round(37 * 0.12)
    # Held-out speakers come from the families in proportion to their sizes; small families keep
    # training speakers (a round-robin over families would empty them).
    sizes = {"tuxpaint": 10, "kde": 20, "fillets": 4, "asterisk": 3}
    for seed in range(20):
        split_of = prepare.split_speakers(infos, 0.12, 0.12, seed=seed)
        for family, size in sizes.items():
            held = sum(split_of[f"{family}-{i}"] != "train" for i in range(size))
            assert abs(held - 0.24 * size) <= 1.5, (seed, family, held)
            assert held < size
    assert prepare.split_speakers(infos, 0.12, 0.12, seed=3) == assignment  # deterministic
    assert prepare.split_speakers(infos, 0.12, 0.12, seed=4) != assignment


def test_split_keeps_tied_speakers_together():
    # ktuberling-fr and klettres-fr may be the same person: they must share a split.
    ties = {f"kde-{i}": f"lang-{i // 2}" for i in range(20)}
    infos = _speakers({"kde": 20, "tuxpaint": 6}, ties)
    for seed in range(10):
        assignment = prepare.split_speakers(infos, 0.2, 0.2, seed=seed)
        for i in range(0, 20, 2):
            assert assignment[f"kde-{i}"] == assignment[f"kde-{i + 1}"]


def test_split_rejects_bad_requests():
    with pytest.raises(ValueError, match="too few"):
        prepare.split_speakers(_speakers({"a": 2}), 0.3, 0.3)
    with pytest.raises(ValueError, match="fractions"):
        prepare.split_speakers(_speakers({"a": 10}), 0.6, 0.5)


def _tone_with_silence(sample_rate: int) -> np.ndarray:
    t = np.arange(int(0.5 * sample_rate)) / sample_rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    silence = np.zeros(sample_rate)  # 1 s
    hiss = 1e-4 * np.random.default_rng(0).standard_normal(sample_rate)  # -70 dB below the tone
    return np.concatenate([silence, tone, silence + hiss]).astype(np.float32)


def test_trim_keeps_the_speech_and_the_padding():
    sr = 16000
    wave = _tone_with_silence(sr)
    trimmed = prepare.trim_silence(wave, sr, threshold_db=-40, pad_seconds=0.1)
    assert abs(len(trimmed) / sr - 0.7) < 0.03  # 0.5 s tone + 2 x 0.1 s padding
    assert np.abs(trimmed).max() == pytest.approx(0.5, abs=1e-3)
    assert len(prepare.trim_silence(np.zeros(sr, np.float32), sr)) == 0
    with pytest.raises(ValueError, match="mono"):
        prepare.trim_silence(np.zeros((2, sr), np.float32), sr)


def test_decode_resamples_stereo_file_to_16k_mono(tmp_path):
    sr = 44100
    mono = _tone_with_silence(sr)
    path = tmp_path / "stereo.ogg"
    sf.write(path, np.stack([mono, mono], axis=1), sr, format="OGG", subtype="VORBIS")
    wave = prepare.decode_audio(path)
    assert wave.ndim == 1 and wave.dtype == np.float32
    assert abs(len(wave) - len(mono) * 16000 / sr) < 0.01 * 16000
    trimmed = prepare.trim_silence(wave, 16000)
    assert abs(len(trimmed) / 16000 - 0.7) < 0.05
    spectrum = np.abs(np.fft.rfft(trimmed))
    assert np.fft.rfftfreq(len(trimmed), 1 / 16000)[spectrum.argmax()] == pytest.approx(440, abs=5)
    with pytest.raises(FileNotFoundError):
        prepare.decode_audio(tmp_path / "missing.wav")
    (tmp_path / "junk.wav").write_bytes(b"not audio at all" * 10)
    with pytest.raises(ValueError, match="cannot decode"):
        prepare.decode_audio(tmp_path / "junk.wav")


def test_pack_and_normalise():
    assert prepare.pack_clips([10, 10, 10, 30, 5], 25) == [[0, 1, 2], [3], [4]]
    assert prepare.pack_clips([10, 10], 0) == [[0], [1]]
    joined = prepare.join_clips([np.ones(3), np.ones(2)], gap=4)
    assert joined.tolist() == [1, 1, 1, 0, 0, 0, 0, 1, 1]
    loud = prepare.normalize_level(np.full(100, 0.5, np.float32), rms_dbfs=-20)
    assert 20 * np.log10(np.sqrt(np.mean(loud**2))) == pytest.approx(-20, abs=1e-3)
    spiky = np.zeros(1000, np.float32)
    spiky[0] = 1.0
    assert np.abs(prepare.normalize_level(spiky, rms_dbfs=-10)).max() <= 0.95 + 1e-6  # no clipping
    with pytest.raises(ValueError, match="silent"):
        prepare.normalize_level(np.zeros(10, np.float32))


def test_write_speaker_writes_16k_files_and_rows(tmp_path):
    waves = [(np.full(8000, 0.1, np.float32) * (i + 1), f"clip{i}.ogg") for i in range(5)]
    rows = prepare.write_speaker(
        tmp_path, "valid", "spk", "pkg", "GPL-2", iter(waves), max_seconds=1.5, pack_seconds=1.0, gap_seconds=0.1
    )
    assert [r.sources for r in rows] == [["clip0.ogg", "clip1.ogg"], ["clip2.ogg"]]  # stops after 1.5 s
    for row in rows:
        info = sf.info(tmp_path / row.path)
        assert info.samplerate == 16000 and info.channels == 1
        assert row.duration_s == pytest.approx(info.duration, abs=1e-3)
        assert row.path.startswith("valid/spk/")


def test_licence_lines_and_synthetic_voice_settings():
    text = "Files: *\nLicense: GPL-2+\n\nFiles: doc/*\nLicense: GFDL-1.2+\nLicense: GPL-2+\n text"
    assert prepare.licence_lines(text) == ["GFDL-1.2+", "GPL-2+"]
    voices = prepare.synthetic_voices(12, seed=1)
    assert len({v.speaker for v in voices}) == 12 and {v.engine for v in voices} == {"espeak-ng", "flite"}
    assert prepare.synthetic_voices(12, seed=1) == voices
    command = voices[0].command("hello there", Path("/tmp/x.wav"))
    assert command[0] == voices[0].engine and "hello there" in command


def test_cli_help_runs():
    result = subprocess.run([sys.executable, prepare.__file__, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--no-synthetic" in result.stdout


def _peak_frequency(wave: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.fft.rfftfreq(len(wave), 1 / sample_rate)[spectrum.argmax()])


def test_decode_headerless_gsm_prompt(tmp_path):
    # Asterisk prompt packs ship raw 8 kHz GSM 06.10 frames (33 bytes each, no header).
    sr = 8000
    t = np.arange(sr) / sr
    path = tmp_path / "prompt.gsm"
    sf.write(path, (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), sr, format="RAW", subtype="GSM610")
    assert path.stat().st_size == 50 * 33
    wave = prepare.decode_audio(path)
    assert abs(len(wave) - 16000) <= 320  # 1 s at 16 kHz, up to one 20 ms GSM frame of slack
    assert _peak_frequency(wave, 16000) == pytest.approx(300, abs=10)


def test_decode_falls_back_to_pyav_for_formats_libsndfile_lacks(tmp_path):
    import av

    sr = 22050
    pcm = (0.3 * np.sin(2 * np.pi * 500 * np.arange(sr) / sr)).astype(np.float32)
    path = tmp_path / "clip.m4a"  # AAC: FFmpeg only
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=sr, layout="mono")
        for start in range(0, sr, 1024):
            frame = av.AudioFrame.from_ndarray(pcm[None, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = sr
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(sf.LibsndfileError):
        sf.read(path)
    wave = prepare.decode_audio(path)
    assert abs(len(wave) - 16000) < 0.1 * 16000
    assert _peak_frequency(wave, 16000) == pytest.approx(500, abs=10)


def _fake_package(cache: Path, name: str, speakers: list[str], clips: int, seed: int) -> Path:
    """An unpacked 'package' with ``clips`` distinct noise-burst wavs per speaker folder."""
    rng = np.random.default_rng(seed)
    root = cache / "unpacked" / name
    for speaker in speakers:
        folder = root / "voices" / speaker
        folder.mkdir(parents=True)
        for i in range(clips):
            sf.write(folder / f"{i}.wav", rng.uniform(-0.5, 0.5, 4000).astype(np.float32), 16000)
    return root


def _select_fake(family: str):
    def select(root: Path):
        return [
            prepare.Clip(p, f"{family}-{p.parent.name}", family, f"{family}-{p.parent.name}")
            for p in sorted((root / "voices").rglob("*.wav"))
        ]

    return select


def test_train_only_package_adds_training_speakers_and_leaves_the_rest_byte_identical(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    roots = {
        "split-a": _fake_package(cache, "split-a", [f"a{i}" for i in range(6)], clips=10, seed=0),
        "split-b": _fake_package(cache, "split-b", [f"b{i}" for i in range(6)], clips=10, seed=1),
        "extra": _fake_package(cache, "extra", ["x0", "x1"], clips=10, seed=2),
        "extra2": _fake_package(cache, "extra2", ["w0"], clips=10, seed=3),  # its speaker sorts before x0
    }
    specs = {
        "split-a": prepare.PackageSpec(_select_fake("a"), "GPL-2"),
        "split-b": prepare.PackageSpec(_select_fake("b"), "GPL-2"),
        "extra": prepare.PackageSpec(_select_fake("x"), "GFDL-1.3", train_only=True),
        "extra2": prepare.PackageSpec(_select_fake("w"), "CC-BY-3", train_only=True),
    }
    monkeypatch.setattr(prepare, "PACKAGES", specs)
    monkeypatch.setattr(prepare, "fetch_package", lambda name, cache_dir: (roots[name], "1.0"))

    def build(out: Path, packages: list[str]) -> dict[str, tuple[str, str, bytes]]:
        args = prepare.parse_args(
            ["--out", str(out), "--cache", str(cache), "--no-synthetic", "--pack-seconds", "0", "--packages", *packages]
        )
        prepare.build_corpus(args)
        rows = (out / "manifest.csv").read_text().splitlines()[1:]
        return {
            line.split(",")[0]: (line.split(",")[1], line.split(",")[2], (out / line.split(",")[0]).read_bytes())
            for line in rows
        }

    without = build(tmp_path / "without", ["split-a", "split-b"])
    with_extra = build(tmp_path / "with", ["split-a", "split-b", "extra"])
    added = {path: row for path, row in with_extra.items() if path not in without}
    assert {row[1] for row in added.values()} == {"x-x0", "x-x1"}
    assert {row[0] for row in added.values()} == {"train"}  # never held out
    assert {path: with_extra[path] for path in without} == without  # same splits, same files, same bytes
    assert {row[0] for row in without.values()} == {"train", "valid", "test"}
    assert "GFDL-1.3" in (tmp_path / "with" / "LICENSES.md").read_text()
    # A second train-only package leaves the first one's files as they were too (a random sequence each).
    with_both = build(tmp_path / "both", ["split-a", "split-b", "extra", "extra2"])
    assert {path: with_both[path] for path in with_extra} == with_extra
    assert {row[1] for path, row in with_both.items() if path not in with_extra} == {"w-w0"}


def test_setup_problems_fail_before_any_download_and_subsets_are_warned_about(tmp_path, monkeypatch, capsys):
    """No speech engine for the synthetic voices, or only train-only packages, failed after every real speaker
    was downloaded and written; a comma-separated list was refused; a subset of the held-out packages draws other
    valid / test speakers than the default corpus (the shipped model's), and now says so."""
    cache = tmp_path / "cache"
    roots = {name: _fake_package(cache, name, [f"{name[-1]}{i}" for i in range(6)], clips=10, seed=i)
             for i, name in enumerate(("split-a", "split-b", "extra"))}
    specs = {"split-a": prepare.PackageSpec(_select_fake("a"), "GPL-2"),
             "split-b": prepare.PackageSpec(_select_fake("b"), "GPL-2"),
             "extra": prepare.PackageSpec(_select_fake("x"), "GFDL-1.3", train_only=True)}
    monkeypatch.setattr(prepare, "PACKAGES", specs)
    fetched = []
    monkeypatch.setattr(prepare, "fetch_package", lambda name, cache_dir: fetched.append(name) or (roots[name], "1"))
    monkeypatch.setattr(prepare.shutil, "which", lambda name: None)
    out = tmp_path / "out"
    assert prepare.main(["--out", str(out), "--cache", str(cache), "--packages", "split-a,split-b"]) == 1
    assert "neither espeak-ng nor flite is installed" in capsys.readouterr().err and fetched == []
    assert prepare.main(["--out", str(out), "--cache", str(cache), "--no-synthetic", "--packages", "extra"]) == 1
    assert "are all train-only" in capsys.readouterr().err and fetched == []
    base = ["--cache", str(cache), "--no-synthetic", "--pack-seconds", "0"]
    assert prepare.main(["--out", str(tmp_path / "all"), *base, "--packages", "split-a,split-b", "extra"]) == 0
    assert fetched == ["split-a", "split-b", "extra"] and "warning" not in capsys.readouterr().err
    assert prepare.main(["--out", str(tmp_path / "sub"), *base, "--packages", "split-a", "extra"]) == 0
    assert "the splits differ from the default corpus's" in capsys.readouterr().err
    # --overwrite with fewer packages leaves no licence file of a package no longer used
    for name in ("split-a", "split-b"):
        doc = roots[name] / "usr/share/doc" / name
        doc.mkdir(parents=True)
        (doc / "copyright").write_text("License: GPL-2\n")
    assert prepare.main(["--out", str(tmp_path / "lic"), *base, "--packages", "split-a", "split-b"]) == 0
    assert prepare.main(["--out", str(tmp_path / "lic"), *base, "--packages", "split-a", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "lic" / "licenses").iterdir()) == ["split-a.copyright"]


def test_hedgewars_selector_takes_one_speaker_per_voice_pack(tmp_path):
    base = tmp_path / "usr/share/games/hedgewars/Data/Sounds"
    for rel in ["voices/Pirate/Hello.ogg", "voices/Default_ru/Oops.ogg", "voices/Pirate/Ouch.ogg", "Explosion.ogg"]:
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(b"")
    clips = prepare.PACKAGES["hedgewars-data"].select(tmp_path)
    assert sorted((c.source.name, c.speaker) for c in clips) == [
        ("Hello.ogg", "hedgewars-Pirate"),
        ("Oops.ogg", "hedgewars-Default_ru"),
        ("Ouch.ogg", "hedgewars-Pirate"),
    ]
    assert prepare.PACKAGES["hedgewars-data"].train_only


def test_festvox_gcin_and_0ad_selectors(tmp_path):
    import zipfile

    def touch(root: Path, rel: str) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")

    ru = tmp_path / "ru"
    for rel in ["ru_0001.wav", "ru_0002.wav"]:
        touch(ru, f"usr/share/festival/voices/russian/msu_ru_nsh_clunits/wav/{rel}")
    touch(ru, "usr/share/festival/voices/russian/msu_ru_nsh_clunits/mcep/ru_0001.mcep")
    clips = prepare.PACKAGES["festvox-ru"].select(ru)
    assert sorted((c.source.name, c.speaker) for c in clips) == [("ru_0001.wav", "festvox-ru-nsh"),
                                                                 ("ru_0002.wav", "festvox-ru-nsh")]
    gcin = tmp_path / "gcin"
    for rel in ["ㄅㄚ1/3.ogg", "ㄅㄚ1/5.ogg", "ㄇㄚ/3.ogg", "ㄇㄚ/7.ogg"]:
        touch(gcin, f"usr/share/gcin-voice/ogg/{rel}")
    clips = prepare.PACKAGES["gcin-voice"].select(gcin)
    assert sorted((c.source.parent.name, c.speaker) for c in clips) == [
        ("ㄅㄚ1", "gcin-3"), ("ㄅㄚ1", "gcin-5"), ("ㄇㄚ", "gcin-3")]
    game = tmp_path / "0ad"
    archive = game / "usr/share/games/0ad/mods/public/public.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as z:
        for name in ["audio/voice/greek/civ/civ_male_attack_1.ogg", "audio/voice/greek/civ/civ_female_attack_1.ogg",
                     "audio/voice/latin/civ/civ_female_build_1.ogg", "audio/voice/global/civ_dog_bark.ogg",
                     "audio/music/theme.ogg", "../evil/civ/civ_male_x.ogg"]:
            z.writestr(name, b"")
    clips = prepare.PACKAGES["0ad-data"].select(game)
    assert sorted((c.source.name, c.speaker) for c in clips) == [
        ("civ_female_attack_1.ogg", "0ad-greek-female"), ("civ_female_build_1.ogg", "0ad-latin-female"),
        ("civ_male_attack_1.ogg", "0ad-greek-male")]
    assert not (tmp_path / "evil").exists() and not (game / "extracted-voices" / "audio" / "music").exists()
    assert prepare.PACKAGES["0ad-data"].select(game) == clips  # extracted once, then read from the folder
    assert all(prepare.PACKAGES[p].train_only for p in ("festvox-ru", "gcin-voice", "0ad-data"))

"""``mossformer2 separate`` end to end (in-process) with a tiny random checkpoint."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import mossformer2.pretrained
from mossformer2 import build_model, save_checkpoint
from mossformer2.audio import read_audio
from mossformer2.cli import build_parser, main, user_path
from mossformer2.cli.separate import Inputs, collect_inputs, mirrored_out_dirs, shard_files
from mossformer2.cli.separate_plan import check_plan
from tests.conftest import make_tiny_config, seeded_tiny_model
from tests.test_hub import REPO, fake_hf_cache


def noise(n, seed=0, channels=1, scale=0.1):
    return (np.random.default_rng(seed).standard_normal((n, channels)) * scale).astype(np.float32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, seeded_tiny_model())  # the weights of conftest's tiny_onnx export
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Equal file names in different folders, several formats and rates."""
    root = tmp_path / "data"
    for sub, seed in [("a", 1), ("b", 2), ("b/deeper", 3)]:
        (root / sub).mkdir(parents=True)
        sf.write(str(root / sub / "talk.wav"), noise(8000, seed), 16000)
    sf.write(str(root / "a" / "stereo.flac"), noise(11025, 4, channels=2), 22050)
    sf.write(str(root / "b" / "music.ogg"), noise(24000, 5), 48000, format="OGG", subtype="VORBIS")
    (root / "a" / "readme.txt").write_text("not audio, not a list of audio either\n")
    return root


def outputs_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_folder_input_mirrors_structure_and_summarises(ckpt, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["separate", str(corpus), "-o", str(out), "--checkpoint", str(ckpt)]) == 0
    assert outputs_under(out) == ["a/stereo_s1.flac", "a/stereo_s2.flac", "a/talk_s1.wav", "a/talk_s2.wav",
                                  "b/deeper/talk_s1.wav", "b/deeper/talk_s2.wav", "b/music_s1.wav",
                                  "b/music_s2.wav", "b/talk_s1.wav", "b/talk_s2.wav"]
    wave, rate = read_audio(out / "a" / "stereo_s1.flac")
    assert rate == 22050 and wave.shape == (1, 11025)  # mixed to mono, input rate kept
    captured = capsys.readouterr()
    assert "separated 5 file(s), skipped 0, failed 0" in captured.out
    assert "real-time factor" in captured.out and "s of audio" in captured.out


def test_globs_lists_scp_and_skip_existing(ckpt, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    listing = tmp_path / "files.txt"
    listing.write_text(f"# my files\n{corpus / 'a' / 'talk.wav'}\n\n")
    scp = tmp_path / "test.scp"
    scp.write_text(f"utt1 {corpus / 'b' / 'talk.wav'}\n")  # Kaldi-style "id path"
    args = ["separate", str(corpus / "b" / "deeper" / "*.wav"), str(listing), str(scp), "-o", str(out),
            "--checkpoint", str(ckpt)]
    assert main(args) == 0
    assert outputs_under(out) == ["a/talk_s1.wav", "a/talk_s2.wav", "b/deeper/talk_s1.wav",
                                  "b/deeper/talk_s2.wav", "b/talk_s1.wav", "b/talk_s2.wav"]
    before = (out / "a" / "talk_s1.wav").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0  # same inputs: every output exists
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "--overwrite" in captured.err and "skipped 3" in captured.out
    assert (out / "a" / "talk_s1.wav").stat().st_mtime_ns == before
    assert main([*args, "--overwrite"]) == 0
    assert (out / "a" / "talk_s1.wav").stat().st_mtime_ns != before


def test_bad_files_fail_alone_with_reasons_and_no_partial_output(ckpt, tmp_path, capsys):
    data = tmp_path / "mixed"
    data.mkdir()
    sf.write(str(data / "good.wav"), noise(8000, 1), 16000)
    (data / "empty.wav").write_bytes(b"")
    (data / "junk.wav").write_text("definitely not audio " * 30)
    sf.write(str(data / "silent.wav"), np.zeros(8000, np.float32), 16000)
    sf.write(str(data / "nan.wav"), np.array([0.1, np.nan] * 4000, np.float32), 16000, subtype="FLOAT")
    sf.write(str(data / "tiny.wav"), noise(5, 2), 16000)
    one = noise(8000, 3)
    sf.write(str(data / "cancels.wav"), np.concatenate([one, -one], axis=1), 16000)  # a channel wired in reverse
    out = tmp_path / "out"
    code = main(["separate", str(data), str(tmp_path / "missing.wav"), str(tmp_path / "nomatch*.wav"),
                 "-o", str(out), "--checkpoint", str(ckpt)])
    assert code == 1
    # Nothing partial, no temp files; mirrored from tmp_path, the common folder of mixed/ and the pattern's folder
    # (a pattern counts though it matches nothing: the layout must not change once it does).
    assert outputs_under(out) == ["mixed/good_s1.wav", "mixed/good_s2.wav"]
    captured = capsys.readouterr()
    assert "separated 1 file(s), skipped 0, failed 8" in captured.out
    for name, reason in [("empty.wav", "empty file"), ("junk.wav", "cannot read"), ("silent.wav", "silent"),
                         ("cancels.wav", "channels cancel when mixed down to mono"),
                         ("nan.wav", "NaN"), ("tiny.wav", "too short"), ("missing.wav", "no such file"),
                         ("nomatch*.wav", "matches no file")]:
        line = next(ln for ln in captured.err.splitlines() if ln.startswith("failed:") and name in ln)
        assert reason in line, line
    # the files that fail while the batch runs are also said at once (a long batch reports them at its end)
    said = [ln for ln in captured.err.splitlines() if ln.startswith("could not separate")]
    assert sorted(Path(ln.split(": ")[0].split()[-1]).name for ln in said) == [
        "cancels.wav", "empty.wav", "junk.wav", "nan.wav", "silent.wav", "tiny.wav"]


def test_equal_output_names_in_one_folder_are_not_overwritten(ckpt, tmp_path, capsys):
    data = tmp_path / "d"
    data.mkdir()
    sf.write(str(data / "a.wav"), noise(4000, 1), 16000)
    sf.write(str(data / "a.ogg"), noise(4000, 2), 16000, format="OGG", subtype="VORBIS")
    assert main(["separate", str(data), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt)]) == 1
    assert outputs_under(tmp_path / "o") == ["a_s1.wav", "a_s2.wav"]
    assert "a.ogg; rename one of them" in capsys.readouterr().err  # sorted order: a.ogg came first
    # a.wav and a.flac keep apart speaker files, but --plot gave them one a_spectrogram.png (the second replaced
    # the first, and reruns took both as done).
    (data / "a.ogg").unlink()
    sf.write(str(data / "a.flac"), noise(4000, 3), 16000)
    assert main(["separate", str(data), "-o", str(tmp_path / "flac"), "--checkpoint", str(ckpt)]) == 0
    assert main(["separate", str(data), "-o", str(tmp_path / "plot"), "--checkpoint", str(ckpt), "--plot"]) == 1
    assert outputs_under(tmp_path / "plot") == ["a_s1.flac", "a_s2.flac", "a_spectrogram.png"]
    assert "a.wav: its outputs would overwrite those of" in capsys.readouterr().err


def test_options_channels_rate_format_plot_dtype(ckpt, tmp_path):
    src = tmp_path / "in" / "duo.wav"
    src.parent.mkdir()
    sf.write(str(src), noise(44100, 3, channels=2), 44100)
    out = tmp_path / "out"
    code = main(["separate", str(src), "-o", str(out), "--checkpoint", str(ckpt), "--channels", "each",
                 "--output-rate", "16000", "--format", "flac", "--subtype", "PCM_24", "--plot",
                 "--dtype", "bfloat16", "--normalize", "peak"])
    assert code == 0
    assert outputs_under(out) == ["duo_s1.flac", "duo_s2.flac", "duo_spectrogram.png"]
    info = sf.info(str(out / "duo_s2.flac"))
    assert (info.channels, info.samplerate, info.frames, info.subtype) == (2, 16000, 16000, "PCM_24")
    assert (out / "duo_spectrogram.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["separate", str(src), "-o", str(out), "--checkpoint", str(ckpt), "--output-rate", "fast"]) == 1


def test_long_file_chunks_and_clearvoice_stitching(ckpt, tmp_path, capsys):
    src = tmp_path / "long.wav"
    sf.write(str(src), noise(16000 * 6, 9), 16000)
    for extra in (["--chunk-seconds", "1.5", "--overlap-seconds", "0.5", "--cuda-graphs", "--device", "cpu"],
                  ["--stitching", "clearvoice", "--chunk-seconds", "30"]):
        out = tmp_path / extra[1]
        with warnings.catch_warnings():  # (pyproject.toml ignores the short-overlap warning in the other tests)
            warnings.filterwarnings("default", message="overlap_seconds=")
            assert main(["separate", str(src), "-o", str(out), "--checkpoint", str(ckpt), *extra]) == 0
        wave, rate = read_audio(out / "long_s1.wav")
        assert wave.shape == (1, 96000) and np.abs(wave).max() > 0
    err = capsys.readouterr().err
    assert "may swap between chunks" in err  # overlap 0.5 s is warned about
    # options that do not apply are said to be ignored, not ignored silently
    assert "--cuda-graphs) applies on CUDA only" in err
    assert "--chunk-seconds, --overlap-seconds) are not used" in err


def test_compile_option_reaches_compile_layers_and_refuses_bf16_on_the_cpu(ckpt, tmp_path, capsys, monkeypatch):
    """--compile reaches Separator(compile_layers=True) (whose compiled output tests/separation/test_separation.py
    compares with eager; here the compiling itself is stubbed out to keep the suite short)."""
    from mossformer2.models.mossformer import MossFormer2

    compiled = []
    monkeypatch.setattr(MossFormer2, "compile_layers", lambda self: compiled.append(self) or self)
    src = tmp_path / "mix.wav"
    sf.write(str(src), noise(12000, 5), 16000, subtype="FLOAT")
    # --device cpu also where a GPU is present: the CPU's warning and refusal
    assert main(["separate", str(src), "-o", str(tmp_path / "out"), "--checkpoint", str(ckpt), "--device", "cpu",
                 "--compile"]) == 0
    assert len(compiled) == 1 and "meant for CUDA" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mix_s1.wav", "mix_s2.wav"]
    out = tmp_path / "bf16"
    assert main(["separate", str(src), "-o", str(out), "--checkpoint", str(ckpt), "--compile",
                 "--dtype", "bfloat16", "--device", "cpu"]) == 1
    assert "float32 only on the CPU" in capsys.readouterr().err and not out.exists()


def test_a_failing_compiler_ends_the_run_with_one_message(ckpt, tmp_path, capsys, monkeypatch):
    """A torch.compile failure (here a backend that raises, as a missing C++ compiler would) would fail every file
    alike: the run stops at the first with one line that names --compile."""
    from mossformer2.models.mossformer import MossFormer2

    def failing_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    def compile_layers(self):
        layers = self.mask_net.mdl.intra_mdl.mossformerM
        for layer in [*layers.layers, *layers.fsmn]:
            layer.compile(backend=failing_backend)
        return self

    monkeypatch.setattr(MossFormer2, "compile_layers", compile_layers)
    torch._dynamo.reset()
    for name in ("a", "b"):
        sf.write(str(tmp_path / f"{name}.wav"), noise(12000, 5), 16000)
    code = main(["separate", str(tmp_path / "a.wav"), str(tmp_path / "b.wav"), "-o", str(tmp_path / "out"),
                 "--checkpoint", str(ckpt), "--device", "cpu", "--compile"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("compiling the network failed (--compile)") == 1
    assert "no C++ compiler found" in err and "failed: " not in err


def test_batch_size_gives_the_same_files(ckpt, tmp_path):
    data = tmp_path / "same"
    data.mkdir()
    for k in range(3):
        sf.write(str(data / f"u{k}.wav"), noise(8000, k), 16000, subtype="FLOAT")
    sf.write(str(data / "other.wav"), noise(7000, 7), 16000, subtype="FLOAT")
    sf.write(str(data / "short.wav"), noise(5001, 8), 16000, subtype="FLOAT")
    sf.write(str(data / "rate.wav"), noise(6000, 9), 22050, subtype="FLOAT")  # batched apart from 16 kHz files
    for batch in ("1", "3"):
        assert main(["separate", str(data), "-o", str(tmp_path / batch), "--checkpoint", str(ckpt),
                     "--batch-size", batch, "--subtype", "FLOAT"]) == 0
    for name in outputs_under(tmp_path / "1"):
        a, _ = read_audio(tmp_path / "1" / name)
        b, _ = read_audio(tmp_path / "3" / name)
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert len(outputs_under(tmp_path / "3")) == 12


def test_builtin_model_is_announced(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mossformer2.pretrained, "DEFAULT_MODEL_FILE", ckpt)
    src = tmp_path / "x.wav"
    sf.write(str(src), noise(4000), 16000)
    assert main(["separate", str(src), "-o", str(tmp_path / "o")]) == 0
    assert "using the built-in model" in capsys.readouterr().err
    assert main(["separate", str(src), "-o", str(tmp_path / "o2"), "--model", "default"]) == 0
    assert outputs_under(tmp_path / "o2") == ["x_s1.wav", "x_s2.wav"]


def test_model_name_from_offline_hub_cache(tmp_path, monkeypatch, capsys):
    from mossformer2.hub import model_name_to_ref

    assert model_name_to_ref("MossFormer2_SS_16K") == REPO  # the repository the fake cache below holds
    fake_hf_cache(tmp_path / "hf", tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = tmp_path / "x.wav"
    sf.write(str(src), noise(4000), 16000)
    assert main(["separate", str(src), "-o", str(tmp_path / "o"), "--model", "MossFormer2_SS_16K"]) == 0
    assert outputs_under(tmp_path / "o") == ["x_s1.wav", "x_s2.wav"]
    assert main(["separate", str(src), "-o", str(tmp_path / "o"), "--model", "nobody/Missing"]) == 1
    assert "hf download nobody/Missing" in capsys.readouterr().err


def test_onnxruntime_backend_needs_an_onnx_file(ckpt, tmp_path, capsys):
    src = tmp_path / "x.wav"
    sf.write(str(src), noise(4000), 16000)
    assert main(["separate", str(src), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt),
                 "--backend", "onnxruntime"]) == 1
    assert "needs --checkpoint MODEL.onnx" in capsys.readouterr().err


def test_onnxruntime_backend_matches_torch(ckpt, tiny_onnx, tmp_path):
    """The exported graph runs the whole pipeline (chunks + short files) through ONNX Runtime."""
    onnx_path = tiny_onnx  # an export of ckpt's weights
    src = tmp_path / "in" / "talk.wav"
    src.parent.mkdir()
    sf.write(str(src), noise(int(2.5 * 16000), 11), 16000, subtype="FLOAT")
    common = ["--chunk-seconds", "1.0", "--overlap-seconds", "0.25", "--subtype", "FLOAT"]
    assert main(["separate", str(src), "-o", str(tmp_path / "torch"), "--checkpoint", str(ckpt), *common]) == 0
    assert main(["separate", str(src), "-o", str(tmp_path / "ort"), "--checkpoint", str(onnx_path),
                 "--backend", "onnxruntime", "--batch-size", "2", *common]) == 0
    for k in (1, 2):
        want, _ = read_audio(tmp_path / "torch" / f"talk_s{k}.wav")
        got, _ = read_audio(tmp_path / "ort" / f"talk_s{k}.wav")
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_chunk_seconds_none_separates_each_file_in_one_pass(ckpt, tmp_path, capsys):
    """One pass per file had no command-line spelling (Python's chunk_seconds=None; `--chunk-seconds 0` is an
    error): `--chunk-seconds none`."""
    from mossformer2.separation import Separator

    src = tmp_path / "talk.wav"
    wave = noise(int(2.5 * 16000), 12)[:, 0]
    sf.write(str(src), wave, 16000, subtype="FLOAT")
    assert main(["separate", str(src), "-o", str(tmp_path / "one"), "--checkpoint", str(ckpt), "--chunk-seconds",
                 "None", "--subtype", "FLOAT", "--no-polarity-ensemble", "--no-wiener-filter"]) == 0
    model = mossformer2.load_model(ckpt)
    whole = Separator(model, device="cpu", chunk_seconds=None, polarity_ensemble=False,
                      wiener_filter=False).separate(wave, 16000)
    chunked = Separator(model, device="cpu", chunk_seconds=1.0, overlap_seconds=0.5, polarity_ensemble=False,
                        wiener_filter=False).separate(wave, 16000)
    got = np.stack([read_audio(tmp_path / "one" / f"talk_s{k}.wav")[0][0] for k in (1, 2)])
    np.testing.assert_allclose(got, whole, atol=1e-5)
    assert np.abs(whole - chunked).max() > 1e-3  # (the chunked pass differs: the check can fail)
    with pytest.raises(SystemExit):
        main(["separate", str(src), "-o", str(tmp_path / "x"), "--chunk-seconds", "never"])
    assert "--chunk-seconds: expected seconds or none, got 'never'" in capsys.readouterr().err


def test_threads_sets_the_cpu_threads_of_torch_and_onnx_runtime(ckpt, tmp_path, monkeypatch, capsys):
    """A shared CPU machine had only OMP_NUM_THREADS to keep `separate` / `evaluate` off the busy cores."""
    src = tmp_path / "talk.wav"
    sf.write(str(src), noise(8000, 3), 16000)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # (restored after the test: the option sets it for ONNX Runtime)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # a one-core share
    try:
        assert main(["separate", str(src), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt),
                     "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    finally:
        torch.set_num_threads(1)
    # more threads than cores ran 75x slower, without a word; 10^5 failed every file, 10^6 crashed
    assert "warning: --threads 2 is more than the 1 CPU core(s) this process may use" in capsys.readouterr().err
    assert main(["separate", str(src), "-o", str(tmp_path / "many"), "--checkpoint", str(ckpt),
                 "--threads", "1000000"]) == 1
    assert "--threads 1000000: this process may use 1 CPU core(s); at most 16 threads" in capsys.readouterr().err
    assert main(["separate", str(src), "-o", str(tmp_path / "z"), "--checkpoint", str(ckpt), "--threads", "0"]) == 1
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err


def test_sharding_covers_every_file_once():
    files = [Path(f"/data/f{i:03d}.wav") for i in range(23)]
    for world in (1, 2, 3, 4, 8, 30):
        shards = [shard_files(list(reversed(files)), rank, world) for rank in range(world)]
        flat = [f for shard in shards for f in shard]
        assert sorted(flat) == files and len(set(flat)) == len(files)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        shard_files(files, 2, 2)


def test_torchrun_rank_processes_its_shard_only(ckpt, tmp_path, monkeypatch, capsys):
    data = tmp_path / "d"
    data.mkdir()
    for k in range(5):
        sf.write(str(data / f"f{k}.wav"), noise(4000, k), 16000)
    done = set()
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert main(["separate", str(data), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt)]) == 0
        now = set(outputs_under(tmp_path / "o"))
        # Rank r takes files r, r + 2, ... of the sorted list, and only those (not the other rank's, then skipped).
        mine = range(rank, 5, 2)
        assert now - done == {f"f{k}_s{j}.wav" for k in mine for j in (1, 2)}
        out = capsys.readouterr().out
        assert f"[rank {rank}/2]" in out and f"separated {len(mine)} file(s), skipped 0" in out, out
        done |= now
    assert len(done) == 10


def test_collect_inputs_and_mirroring(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    for rel in ["x/a.wav", "x/y/a.wav", "x/y/b.mp3", "x/notes.md"]:
        (tmp_path / rel).write_bytes(b"RIFF")
    found = collect_inputs([str(tmp_path / "x"), str(tmp_path / "x" / "a.wav"), str(tmp_path / "none.wav")])
    assert [p.relative_to(tmp_path).as_posix() for p in found.files] == ["x/a.wav", "x/y/a.wav", "x/y/b.mp3"]
    assert found.errors == [(str(tmp_path / "none.wav"), "no such file or folder")]
    dirs = mirrored_out_dirs(found.files, Path("/out"), found.roots)
    assert sorted(str(d) for d in dirs.values()) == ["/out", "/out/y", "/out/y"]


def test_folders_and_patterns_skip_the_output_folder(tmp_path, capsys):
    """Separating a folder into a folder inside it, twice, must not separate the first run's outputs."""
    (tmp_path / "y").mkdir()
    for rel in ("a.wav", "y/b.wav"):
        sf.write(tmp_path / rel, np.random.default_rng(0).standard_normal(2000) * 0.1, 16000)
    (tmp_path / "out").mkdir()
    sf.write(tmp_path / "out" / "old_s1.wav", np.zeros(100), 16000)
    found = collect_inputs([str(tmp_path), str(tmp_path / "*.wav"), str(tmp_path / "out" / "old_s1.wav")],
                           exclude=tmp_path / "out")
    assert [p.relative_to(tmp_path).as_posix() for p in found.files] == ["a.wav", "out/old_s1.wav", "y/b.wav"]
    assert found.excluded == 1  # the folder's find; the pattern does not reach out/, the named file is kept
    assert collect_inputs([str(tmp_path)]).excluded == 0
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", build_model(make_tiny_config()))
    args = ["separate", str(tmp_path), "-o", str(tmp_path / "out"), "--checkpoint", str(tmp_path / "m.pt")]
    for run in range(2):
        assert main(args + (["--overwrite"] if run else [])) == 0
    err = capsys.readouterr().err
    assert "ignoring 1 file(s)" in err and "ignoring 5 file(s)" in err  # old_s1, then + 4 outputs
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.wav")) == [
        "a_s1.wav", "a_s2.wav", "old_s1.wav", "y/b_s1.wav", "y/b_s2.wav"]


def test_a_bad_output_folder_fails_before_any_work(ckpt, tmp_path, capsys):
    """An output folder that is a file, or lies under one, is one clear error before the model loads (it was
    a separation followed by an errno message per input file)."""
    src = tmp_path / "a.wav"
    sf.write(str(src), noise(4000), 16000)
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    missing_model = str(tmp_path / "not_loaded.pt")  # the model would be loaded after the folder check
    for out, reason in [(blocker, "it is a file, not a folder"), (blocker / "sub", f"{blocker} is a file")]:
        assert main(["separate", str(src), "-o", str(out), "--checkpoint", missing_model]) == 1
        err = capsys.readouterr().err
        assert "mossformer2 separate: error: " in err and reason in err and "checkpoint" not in err, err
    assert blocker.read_text() == "a file, not a folder"


def test_an_output_folder_that_refuses_writes_fails_before_any_work(ckpt, tmp_path, capsys, monkeypatch):
    """os.access can say yes where writes fail (root on sysfs, NFS root_squash): a probe write finds it before
    the model loads, instead of every input failing after its separation with the name of a temp file."""
    import tempfile

    src = tmp_path / "a.wav"
    sf.write(str(src), noise(4000), 16000)
    out = tmp_path / "out"
    out.mkdir()
    real = tempfile.TemporaryFile

    def refused(*args, **kwargs):
        if Path(kwargs.get("dir", "")) == out:
            raise PermissionError(13, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    missing_model = str(tmp_path / "not_loaded.pt")
    assert main(["separate", str(src), "-o", str(out), "--checkpoint", missing_model]) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write into the output folder {out}: Permission denied" in err and "checkpoint" not in err
    assert list(out.iterdir()) == []


def test_float_samples_into_flac_fail_before_separating(ckpt, tmp_path, capsys):
    """FLAC holds integer samples: --subtype FLOAT with FLAC outputs (a FLAC input's default) is refused up
    front, not after separating every file."""
    sf.write(str(tmp_path / "a.flac"), noise(4000), 16000)
    sf.write(str(tmp_path / "b.wav"), noise(4000), 16000)
    out = tmp_path / "out"
    assert main(["separate", str(tmp_path / "a.flac"), str(tmp_path / "b.wav"), "-o", str(out), "--checkpoint",
                 str(ckpt), "--subtype", "FLOAT"]) == 1
    err = capsys.readouterr().err
    assert "mossformer2 separate: error: --subtype FLOAT" in err and "--format wav" in err, err
    assert outputs_under(out) == []  # b.wav was not separated either: the request is refused as a whole
    assert main(["separate", str(tmp_path / "a.flac"), "-o", str(out), "--checkpoint", str(ckpt),
                 "--subtype", "FLOAT", "--format", "wav"]) == 0
    assert outputs_under(out) == ["a_s1.wav", "a_s2.wav"]


def test_list_paths_with_spaces_and_symlinked_inputs_keep_their_names(ckpt, tmp_path):
    """A list line that names a file with spaces or '#' is that file (it was split at the first space); a
    symlinked input (git-annex, DVC, Hugging Face cache) gives outputs named after the link, not its target."""
    spaced = tmp_path / "my recordings" / "take #1 final.wav"
    spaced.parent.mkdir()
    sf.write(str(spaced), noise(4000, 1), 16000)
    blob = tmp_path / "store" / "SHA256E-s8044--0123abcd"
    blob.parent.mkdir()
    sf.write(str(blob), noise(4000, 2), 16000, format="WAV")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "meeting.wav").symlink_to(blob)
    listing = tmp_path / "todo.txt"
    listing.write_text(f"my recordings/take #1 final.wav\n{tmp_path / 'links' / 'meeting.wav'}\n")
    found = collect_inputs([str(listing)])
    assert found.errors == [] and [p.name for p in found.files] == ["meeting.wav", "take #1 final.wav"]
    out = tmp_path / "out"
    assert main(["separate", str(listing), "-o", str(out), "--checkpoint", str(ckpt)]) == 0
    assert outputs_under(out) == ["links/meeting_s1.wav", "links/meeting_s2.wav",
                                  "my recordings/take #1 final_s1.wav", "my recordings/take #1 final_s2.wav"]


@pytest.mark.parametrize("overwrite", [True, False])
def test_outputs_that_are_inputs_of_the_same_run_are_refused(ckpt, tmp_path, monkeypatch, capsys, overwrite):
    """`separate *.wav -o . --overwrite` once wrote a.wav's outputs over the input a_s1.wav (and without
    --overwrite too when only some of a.wav's outputs existed): the run is refused before anything is written."""
    sf.write(str(tmp_path / "a.wav"), noise(4000, 1), 16000)
    sf.write(str(tmp_path / "a_s1.wav"), noise(4000, 2), 16000)  # an input that a.wav's output would replace
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.chdir(tmp_path)
    args = ["separate", "a_s1.wav", str(tmp_path / "a.wav"), "-o", ".", "--checkpoint", str(ckpt)]
    assert main(args + (["--overwrite"] if overwrite else [])) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to overwrite inputs" in err and "a_s1.wav" in err, err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing lost


def test_layout_follows_the_named_inputs_not_the_files_found(ckpt, tmp_path, capsys):
    """Outputs mirror the folder named, not the common folder of the files found there: with data/a/x.wav alone
    the layout was OUT/x_s1.wav, and after data/b/y.wav arrived a rerun re-separated x into OUT/a/ and left the
    first outputs behind."""
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    sf.write(str(data / "a" / "x.wav"), noise(4000, 1), 16000)
    args = ["separate", str(data), "-o", str(tmp_path / "out"), "--checkpoint", str(ckpt)]
    assert main(args) == 0
    assert outputs_under(tmp_path / "out") == ["a/x_s1.wav", "a/x_s2.wav"]
    (data / "b").mkdir()
    sf.write(str(data / "b" / "y.wav"), noise(4000, 2), 16000)
    capsys.readouterr()
    assert main(args) == 0
    assert "separated 1 file(s), skipped 1" in capsys.readouterr().out  # x was not separated again
    assert outputs_under(tmp_path / "out") == ["a/x_s1.wav", "a/x_s2.wav", "b/y_s1.wav", "b/y_s2.wav"]

    def layout(*specs: str) -> list[str]:
        found = collect_inputs(list(specs))
        dirs = mirrored_out_dirs(found.files, Path("/out"), found.roots)
        return sorted(str(dirs[f] / f.name) for f in found.files)

    assert layout(str(data / "*" / "x.wav")) == ["/out/a/x.wav"]  # a pattern: its folder before the wildcard
    assert layout(str(data / "a" / "x.wav")) == ["/out/x.wav"]  # a file named alone: flat
    # Equal names in folders named one by one: apart under their common folder (no clash).
    sf.write(str(data / "b" / "x.wav"), noise(4000, 3), 16000)
    assert layout(str(data / "a"), str(data / "b" / "x.wav")) == ["/out/a/x.wav", "/out/b/x.wav"]
    # A list: the common folder of its entries, whichever of them exist.
    listing = tmp_path / "todo.lst"
    listing.write_text(f"{data / 'b' / 'y.wav'}\n{data / 'b' / 'later' / 'z.wav'}\n")
    assert layout(str(listing)) == ["/out/later/z.wav", "/out/y.wav"]


def test_inputs_that_yield_no_file_are_errors(ckpt, tmp_path, monkeypatch, capsys):
    """An empty folder, a folder whose every file lies inside the output folder (`separate . -o ./out` where only
    ./out has audio) and an empty list were 'separated 0 file(s)' with exit status 0."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no audio here")
    here = tmp_path / "here"
    (here / "out").mkdir(parents=True)
    for name in ("a.wav", "b.wav"):
        sf.write(str(here / "out" / name), noise(4000), 16000)
    (tmp_path / "none.lst").write_text("# nothing yet\n")
    out = here / "out"
    found = collect_inputs([str(tmp_path / "empty"), str(here), str(here / "**" / "*.wav"),
                            str(tmp_path / "none.lst")], exclude=out)
    assert found.files == [] and found.excluded == 4
    assert found.errors == [(str(tmp_path / "empty"), "no audio files in the folder"),
                            (str(here), f"all 2 file(s) found lie inside the output folder {out}"),
                            (str(here / "**" / "*.wav"), f"all 2 file(s) found lie inside the output folder {out}"),
                            (str(tmp_path / "none.lst"), "the list names no file")]
    # The folder itself, or one around it, as the output folder: its files are inputs (in place; data/raw -o data)
    assert len(collect_inputs([str(out)], exclude=out).files) == 2
    assert len(collect_inputs([str(out)], exclude=here).files) == 2
    # found before the model is loaded (seconds for a large checkpoint)
    monkeypatch.setattr("mossformer2.cli.separate._load_model", lambda *_: pytest.fail("the model was loaded"))
    assert main(["separate", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt)]) == 1
    assert "failed: " in capsys.readouterr().err
    assert main(["separate", str(tmp_path / "typo.wav"), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt)]) == 1
    assert "failed: " in capsys.readouterr().err
    monkeypatch.undo()
    # The run-level guard: nothing separated, skipped or failed is an error, not success.
    monkeypatch.setattr("mossformer2.cli.separate.collect_inputs", lambda *_args, **_kwargs: Inputs())
    assert main(["separate", str(here), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt)]) == 1
    assert "error: nothing to separate" in capsys.readouterr().err


def test_list_files_name_missing_kaldi_paths_and_read_any_bytes(ckpt, tmp_path, capsys):
    """`utt2 missing.wav` reported `no such audio file: .../utt2`; a Latin-1 list aborted the whole run with a
    bare 'utf-8' codec error."""
    sf.write(str(tmp_path / "r.wav"), noise(4000, 1), 16000)
    scp = tmp_path / "wav.scp"
    scp.write_text("utt1 r.wav\nutt2 missing_recording.wav\nmix.wav s1.wav s2.wav\n")
    assert collect_inputs([str(scp)]).files == [tmp_path / "missing_recording.wav", tmp_path / "mix.wav",
                                                tmp_path / "r.wav"]
    sf.write(str(tmp_path / "s1.wav"), noise(4000, 3), 16000)  # the mixture missing, its s1 there: not s1 instead
    (tmp_path / "mixes.lst").write_text("gone_mix.wav s1.wav r.wav\n")
    assert collect_inputs([str(tmp_path / "mixes.lst")]).files == [tmp_path / "gone_mix.wav"]
    latin = os.fsencode(tmp_path) + b"/caf\xe9.wav"  # a file name that is not UTF-8, as on an old share
    sf.write(latin, noise(4000, 2), 16000, format="WAV")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9.wav\n")
    assert [os.fsencode(p) for p in collect_inputs([str(tmp_path / "latin1.txt")]).files] == [latin]
    assert main(["separate", str(scp), str(tmp_path / "latin1.txt"), "-o", str(tmp_path / "o"),
                 "--checkpoint", str(ckpt)]) == 1
    captured = capsys.readouterr()
    assert "separated 2 file(s), skipped 0, failed 2" in captured.out
    assert f"no such audio file: {tmp_path / 'missing_recording.wav'}" in captured.err
    assert len(list((tmp_path / "o").glob("caf*_s1.wav"))) == 1


def test_a_folder_scan_leaves_out_earlier_outputs_beside_their_inputs(ckpt, tmp_path, capsys):
    """`separate d/a.wav d/b.wav -o d` writes a_s1.wav ... beside the inputs; a later `separate d -o out` separated
    them again (a_s1_s1.wav, ...: 6 files where 2 were recordings). Named one by one, they are still taken."""
    data = tmp_path / "d"
    data.mkdir()
    for k, name in enumerate(("a.wav", "b.flac", "c_s1.wav")):  # c_s1.wav: no c.* beside it, a recording
        sf.write(str(data / name), noise(4000, k), 16000)
    assert main(["separate", str(data / "a.wav"), str(data / "b.flac"), "-o", str(data),
                 "--checkpoint", str(ckpt)]) == 0
    capsys.readouterr()
    assert main(["separate", str(data), "-o", str(tmp_path / "out"), "--checkpoint", str(ckpt)]) == 0
    assert outputs_under(tmp_path / "out") == [f"{stem}_s{k}.{ext}" for stem, ext in
                                               (("a", "wav"), ("b", "flac"), ("c_s1", "wav")) for k in (1, 2)]
    captured = capsys.readouterr()
    assert "ignoring 4 file(s) named as outputs of an input beside them (like a_s1.wav beside a.wav)" in captured.err
    assert "separated 3 file(s)" in captured.out
    assert main(["separate", str(data / "a_s1.wav"), "-o", str(tmp_path / "named"), "--checkpoint", str(ckpt)]) == 0
    assert outputs_under(tmp_path / "named") == ["a_s1_s1.wav", "a_s1_s2.wav"]
    # So a folder separates into itself (Asteroid's default), once: `-o` the folder was refused ("all files lie
    # inside the output folder"); a rerun skips what is done.
    capsys.readouterr()
    for _run in range(2):
        assert main(["separate", str(data), "-o", str(data), "--checkpoint", str(ckpt)]) == 0
    assert sorted(p.name for p in data.iterdir()) == sorted(
        ["a.wav", "b.flac", "c_s1.wav", *(f"{stem}_s{k}.{ext}" for stem, ext in
                                          (("a", "wav"), ("b", "flac"), ("c_s1", "wav")) for k in (1, 2))])
    assert "separated 0 file(s), skipped 3" in capsys.readouterr().out.splitlines()[-1]


def test_kaldi_commands_pipes_and_standard_input_are_named_as_such(tmp_path):
    """A Kaldi `id sox x.wav -t wav - |` entry was "no such audio file: .../id"; `/dev/stdin`, a FIFO and `-`
    were "no such file or folder"."""
    scp = tmp_path / "wav.scp"
    scp.write_text("utt1 sox /data/a.wav -t wav - |\n")
    found = collect_inputs([str(scp)])
    assert found.errors == [(str(scp), "cannot read the list file: line 1 is a command (ends in '|'), which is not "
                                       "run: write its audio to a file and list that")]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    found = collect_inputs(["-", str(fifo), str(tmp_path / "gone.wav")])
    reasons = dict(found.errors)
    for spec in ("-", str(fifo)):
        assert reasons[spec].startswith("not a regular file: standard input, pipes and devices are not read")
    assert reasons[str(tmp_path / "gone.wav")] == "no such file or folder"


def test_a_list_with_a_byte_order_mark_and_an_output_folder_under_home(ckpt, tmp_path, monkeypatch, capsys):
    """A list saved by a Windows editor starts with U+FEFF (its first entry failed as missing); `--out-dir=~/x`,
    which the shell leaves as it is, made a folder named `~` in the current one."""
    sf.write(str(tmp_path / "a.wav"), noise(4000, 1), 16000)
    (tmp_path / "list.txt").write_bytes(b"\xef\xbb\xbfa.wav\r\n")
    assert collect_inputs([str(tmp_path / "list.txt")]).files == [tmp_path / "a.wav"]
    sf.write(str(tmp_path / "take#2.wav"), noise(4000, 2), 16000)  # a # inside a name is no comment
    (tmp_path / "ids.scp").write_text("utt1 take#2.wav # first take\n")
    assert collect_inputs([str(tmp_path / "ids.scp")]).files == [tmp_path / "take#2.wav"]
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the rerun skips: the outputs are where the first run wrote them
        assert main(["separate", str(tmp_path / "list.txt"), "--out-dir=~/sep", "--checkpoint", str(ckpt)]) == 0
    assert outputs_under(home / "sep") == ["a_s1.wav", "a_s2.wav"] and not (tmp_path / "~").exists()
    commands = build_parser()._subparsers._group_actions[0].choices  # every path option of every command
    paths = [(name, action.dest, action.type) for name, sub in commands.items() for action in sub._actions
             if action.dest in ("out_dir", "out", "output", "data", "config", "exp_dir", "recipe", "wsj_root")]
    assert len(paths) == 10 and all(kind is user_path for _, _, kind in paths), paths
    assert "skipped 1" in capsys.readouterr().out


def test_outputs_a_format_cannot_hold_fail_before_separating(ckpt, tmp_path, capsys):
    """FLAC holds at most 8 channels and rates up to 655350 Hz: the run failed after separating, naming a temp
    file ('Error opening .../.x_s1.XXXX.tmp.XXXX.tmp.flac': Format not recognised)."""
    src = tmp_path / "ch10.wav"
    sf.write(str(src), noise(4000, 1, channels=10), 16000)
    out = tmp_path / "out"
    for extra, cause in [(["--channels", "each"], "FLAC cannot store 10 channels: use the WAV format "
                                                   "(--format wav)"),
                         (["--output-rate", "700000"], "FLAC cannot store a sample rate of 700000 Hz")]:
        assert main(["separate", str(src), "-o", str(out), "--checkpoint", str(ckpt), "--format", "flac",
                     *extra]) == 1
        err = capsys.readouterr().err
        assert f"error: 1 of 1 input(s) cannot be written as asked (e.g. ch10.wav): {cause}" in err, err
        assert "tmp" not in err and not out.exists()  # refused before anything was separated or created
    assert main(["separate", str(src), "-o", str(out), "--checkpoint", str(ckpt), "--channels", "each"]) == 0
    assert sf.info(str(out / "ch10_s1.wav")).channels == 10


def test_folder_scans_skip_hidden_files_and_folders(tmp_path):
    """macOS `._x.wav` sidecars failed as 'cannot read ... as audio', and a killed run's temp file
    `.x_s1.k2j3h4.tmp.wav` was separated into `.x_s1.k2j3h4.tmp_s1.wav`."""
    (tmp_path / "d" / ".trash").mkdir(parents=True)
    for rel in ("x.wav", ".x_s1.k2j3h4.tmp.wav", ".trash/y.wav", "sub.d/z.wav"):
        (tmp_path / "d" / rel).parent.mkdir(exist_ok=True)
        sf.write(str(tmp_path / "d" / rel), noise(100), 16000)
    (tmp_path / "d" / "._x.wav").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    found = collect_inputs([str(tmp_path / "d")])
    assert [p.relative_to(tmp_path / "d").as_posix() for p in found.files] == ["sub.d/z.wav", "x.wav"]
    hidden_root = collect_inputs([str(tmp_path / "d" / ".trash")])  # a hidden folder named itself is searched
    assert [p.name for p in hidden_root.files] == ["y.wav"]


def test_bad_options_leave_no_output_folder(ckpt, tmp_path, capsys):
    """`separate x.wav -o fresh --chunk-seconds 0` and `demo -o fresh --sir nan` created `fresh` and then
    refused the option."""
    src = tmp_path / "x.wav"
    sf.write(str(src), noise(4000), 16000)
    fresh = tmp_path / "fresh" / "deeper"
    for bad in (["--chunk-seconds", "0"], ["--batch-size", "0"], ["--format", "flac", "--subtype", "FLOAT"]):
        assert main(["separate", str(src), "-o", str(fresh), "--checkpoint", str(ckpt), *bad]) == 1
        assert "error: " in capsys.readouterr().err and not (tmp_path / "fresh").exists(), bad
    three = tmp_path / "three.pt"
    save_checkpoint(three, build_model(make_tiny_config(num_spks=3)))
    for bad in (["--sir", "nan"], ["--checkpoint", str(three)]):
        assert main(["demo", "-o", str(fresh), "--device", "cpu", *bad]) == 1
        assert "error: " in capsys.readouterr().err and not (tmp_path / "fresh").exists(), bad


SEPARATOR_FLAGS = ["--dtype", "bfloat16", "--chunk-seconds", "3", "--overlap-seconds", "0.5", "--stitching",
                   "clearvoice", "--normalize", "peak", "--no-polarity-ensemble", "--wiener-filter"]
SEPARATOR_KWARGS = {"dtype": "bfloat16", "chunk_seconds": 3.0, "overlap_seconds": 0.5, "stitching": "clearvoice",
                    "normalize": "peak", "polarity_ensemble": False, "wiener_filter": True}


def recording_separator(monkeypatch) -> list[dict]:
    """Replace the Separator the commands build with one that records its keyword arguments."""
    import mossformer2.separation as separation

    seen: list[dict] = []

    class Recording(separation.Separator):
        def __init__(self, model, **kwargs):
            seen.append(kwargs)
            super().__init__(model, **kwargs)

    monkeypatch.setattr(separation, "Separator", Recording)
    return seen


def test_separate_passes_its_options_to_the_separator(ckpt, tmp_path, monkeypatch):
    """Each option reaches the Separator (an audit hard-coded dtype, stitching and normalize: no test noticed)."""
    sf.write(str(tmp_path / "a.wav"), noise(8000), 16000)
    seen = recording_separator(monkeypatch)
    assert main(["separate", str(tmp_path / "a.wav"), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt),
                 "--device", "cpu", "--batch-size", "2", "--channels", "each", *SEPARATOR_FLAGS]) == 0
    (kwargs,) = seen
    assert {key: kwargs[key] for key in SEPARATOR_KWARGS} == SEPARATOR_KWARGS
    assert (kwargs["batch_size"], kwargs["channels"]) == (2, "each")


def test_option_choices_are_the_librarys():
    """The CLI spells out the choices that the separation package and audio.py define (importing those modules when the
    parser is built would make `mossformer2 --help` load numpy and scipy): they must not drift apart."""
    import argparse

    from mossformer2.audio import WRITE_SUBTYPES
    from mossformer2.cli import build_parser
    from mossformer2.separation.outputs import OUTPUT_FORMATS
    from mossformer2.separation.separator import BACKENDS, CHANNELS

    (subcommands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    choices = {a.dest: a.choices for a in subcommands.choices["separate"]._actions if a.choices}
    assert {key: tuple(choices[key]) for key in ("backend", "channels", "format", "subtype")} == {
        "backend": BACKENDS, "channels": CHANNELS, "format": OUTPUT_FORMATS, "subtype": WRITE_SUBTYPES}


def test_evaluate_passes_its_options_to_the_separator(ckpt, tmp_path, monkeypatch):
    from tests.evaluation.test_mix import make_speaker_folder

    speakers = make_speaker_folder(tmp_path / "speakers", speakers=2, files=1)
    assert main(["mix", str(speakers), "-o", str(tmp_path / "mixed"), "--num-mixtures", "1"]) == 0
    seen = recording_separator(monkeypatch)
    assert main(["evaluate", "--data", str(tmp_path / "mixed"), "--out", str(tmp_path / "scores"), "--checkpoint",
                 str(ckpt), "--device", "cpu", "--metrics", "si_sdr", *SEPARATOR_FLAGS]) == 0
    (kwargs,) = seen
    assert {key: kwargs[key] for key in SEPARATOR_KWARGS} == SEPARATOR_KWARGS


def test_progress_bars_only_on_a_terminal_and_quiet_leaves_the_summary(ckpt, tmp_path, monkeypatch, capsys):
    src = tmp_path / "long.wav"
    sf.write(str(src), noise(56000, 6), 16000)  # 3.5 s: two 2 s chunks
    args = ["separate", str(src), "-o", str(tmp_path / "out"), "--checkpoint", str(ckpt), "--chunk-seconds", "2",
            "--overlap-seconds", "1"]
    assert main(args) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal (a log file): no \r bars, no cursor codes
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main([*args, "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "files:" in err and "chunks:" in err
    assert main([*args, "--overwrite", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "separated 1 file(s)" in captured.out
    assert main([*args, "-q"]) == 0  # skipped: without the per-file note
    captured = capsys.readouterr()
    assert captured.err == "" and "skipped 1" in captured.out
    with warnings.catch_warnings():  # (pyproject.toml ignores this warning in the other tests)
        warnings.filterwarnings("default", message="overlap_seconds=")
        assert main([*args, "--overlap-seconds", "0.5", "--overwrite", "-q"]) == 0  # warnings still show
    assert capsys.readouterr().err.startswith("mossformer2 separate: warning: overlap_seconds=0.5 (--overlap-seconds)")


def test_a_lone_file_with_an_output_name_is_not_replaced(ckpt, tmp_path, capsys):
    src = tmp_path / "mix.wav"
    sf.write(str(src), noise(8000, 7), 16000)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mix_s1.wav").write_text("a reference the user saved here")
    args = ["separate", str(src), "-o", str(out), "--checkpoint", str(ckpt)]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert f"failed: {src}: not separated: {out / 'mix_s1.wav'} exists but mix_s2.wav does not" in captured.err
    assert "--overwrite to replace it" in captured.err and "failed 1" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["mix_s1.wav"]
    assert (out / "mix_s1.wav").read_text() == "a reference the user saved here"
    assert main([*args, "--overwrite"]) == 0
    assert sf.info(str(out / "mix_s1.wav")).frames == 8000 and (out / "mix_s2.wav").is_file()
    # Folders with the outputs' names are no earlier outputs: the input was "skipped" with exit code 0.
    folders = tmp_path / "folders"
    for name in ("mix_s1.wav", "mix_s2.wav"):
        (folders / name).mkdir(parents=True)
    for overwrite in ([], ["--overwrite"]):  # with --overwrite it was found only after separating
        assert main(["separate", str(src), "-o", str(folders), "--checkpoint", str(ckpt), *overwrite]) == 1
        assert f"{folders / 'mix_s1.wav'} is a folder, where an output file goes" in capsys.readouterr().err


def test_plot_counts_as_an_output_and_a_missing_one_is_drawn_from_the_outputs(ckpt, tmp_path, capsys):
    src = tmp_path / "mix.wav"
    sf.write(str(src), noise(8000, 8, channels=2), 16000)
    out = tmp_path / "out"
    args = ["separate", str(src), "-o", str(out), "--checkpoint", str(ckpt), "--channels", "each"]
    assert main(args) == 0
    speaker_file = out / "mix_s1.wav"
    before = speaker_file.stat().st_mtime_ns
    capsys.readouterr()
    assert main([*args, "--plot"]) == 0  # an earlier run without --plot: only the spectrogram is missing
    assert "writing only its missing spectrogram" in capsys.readouterr().err
    assert (out / "mix_spectrogram.png").read_bytes()[:4] == b"\x89PNG"
    assert speaker_file.stat().st_mtime_ns == before  # not separated again
    assert main([*args, "--plot"]) == 0
    assert "skipped 1" in capsys.readouterr().out
    (out / "mix_s2.wav").unlink()  # plot and one speaker file: not a complete set, nothing replaced
    assert main([*args, "--plot"]) == 1
    assert "mix_s2.wav does not" in capsys.readouterr().err and speaker_file.stat().st_mtime_ns == before


@pytest.mark.parametrize("rate", ["1", "2147483648"])  # 2**31 crashed libsndfile with an OverflowError
def test_output_rates_outside_1000_to_768000_hz_are_refused(ckpt, tmp_path, capsys, rate):
    src = tmp_path / "mix.wav"
    sf.write(str(src), noise(8000, 9), 16000)
    assert main(["separate", str(src), "-o", str(tmp_path / "out"), "--checkpoint", str(ckpt),
                 "--output-rate", rate]) == 1
    assert f"--output-rate must be 1000 to 768000 Hz, got {rate}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_spectrogram_that_cannot_be_drawn_from_the_outputs_counts_as_failed_only(ckpt, tmp_path, capsys):
    src = tmp_path / "mix.wav"
    sf.write(str(src), noise(8000, 8), 16000)
    out = tmp_path / "out"
    args = ["separate", str(src), "-o", str(out), "--checkpoint", str(ckpt)]
    assert main(args) == 0
    sf.write(str(out / "mix_s2.wav"), noise(4000, 9), 16000)  # the speaker files' lengths now differ
    capsys.readouterr()
    assert main([*args, "--plot"]) == 1
    captured = capsys.readouterr()
    assert "skipped 0, failed 1" in captured.out and "cannot write its spectrogram" in captured.err


def test_quiet_leaves_out_our_info_notes(tmp_path, caplog, capsys):
    import logging

    from torch.optim.swa_utils import AveragedModel

    model = build_model(make_tiny_config())
    ckpt = tmp_path / "averaged.pt"  # holds a moving average: loading it says which weights it gives (INFO)
    save_checkpoint(ckpt, model, extra={"ema": AveragedModel(model).state_dict()})
    src = tmp_path / "mix.wav"
    sf.write(str(src), noise(8000, 10), 16000)
    args = ["separate", str(src), "-o", str(tmp_path / "out"), "--checkpoint", str(ckpt), "--overwrite"]
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
        assert "using the moving average" in caplog.text
        caplog.clear()
        assert main([*args, "--quiet"]) == 0
    assert not [r for r in caplog.records if r.name.startswith("mossformer2") and r.levelno < logging.WARNING]
    assert "separated 1 file(s)" in capsys.readouterr().out


def test_model_config_gives_a_bare_state_dict_its_architecture(tiny_onnx, tmp_path, capsys):
    """A bare state dict of a model trained at 8 kHz: its shapes cannot tell the rate, so without
    ``--model-config`` 16 kHz is assumed (a warning) and the model hears the input at the wrong rate."""
    import yaml

    config = seeded_tiny_model().config.replace(sample_rate=8000)
    model = build_model(config)
    model.load_state_dict(seeded_tiny_model().state_dict())
    save_checkpoint(tmp_path / "ours.pt", model)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"model": config.to_dict()}))
    src = tmp_path / "in" / "talk.wav"
    src.parent.mkdir()
    sf.write(str(src), noise(8000, 3), 16000)
    runs = {"ours": ["--checkpoint", str(tmp_path / "ours.pt")], "bare": ["--checkpoint", str(tmp_path / "bare.pt")],
            "bare+config": ["--checkpoint", str(tmp_path / "bare.pt"), "--model-config", str(tmp_path / "tiny.yaml")]}
    outputs = {}
    for name, extra in runs.items():
        assert main(["separate", str(src), "-o", str(tmp_path / name), "--subtype", "FLOAT", "-q", *extra]) == 0
        outputs[name] = read_audio(tmp_path / name / "talk_s1.wav")[0]
        err = capsys.readouterr().err
        assert ("assumed sample_rate=16000" in err) == (name == "bare")
    np.testing.assert_array_equal(outputs["bare+config"], outputs["ours"])
    assert np.abs(outputs["bare"] - outputs["ours"]).max() > 1e-4

    assert main(["info", "--checkpoint", str(tmp_path / "bare.pt"), "--model-config", str(tmp_path / "tiny.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"config: from --model-config {tmp_path / 'tiny.yaml'}" in out and "  sample_rate: 8000" in out
    assert main(["separate", str(src), "-o", str(tmp_path / "onnx"), "--checkpoint", str(tiny_onnx),
                 "--model-config", str(tmp_path / "tiny.yaml")]) == 1
    assert "is an export, which runs the architecture it was exported with" in capsys.readouterr().err
    assert main(["info", "--checkpoint", str(tiny_onnx), "--model-config", str(tmp_path / "tiny.yaml")]) == 1
    assert "is an export, which runs the architecture it was exported with" in capsys.readouterr().err
    assert main(["separate", str(src), "-o", str(tmp_path / "t"), "--checkpoint", str(tiny_onnx), "--backend",
                 "torch"]) == 1
    assert "backend 'torch' (--backend torch) needs a torch model; this one is an ONNX export" in (
        capsys.readouterr().err)
    for command in (["separate", str(src), "-o", str(tmp_path / "named"), "--model", "default"],
                    ["separate", str(src), "-o", str(tmp_path / "builtin")], ["info"]):  # they store their own
        assert main([*command, "--model-config", str(tmp_path / "tiny.yaml")]) == 1
        assert "--model-config gives a --checkpoint its architecture" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("model: {group_sise: 64}\n")
    assert main(["separate", str(src), "-o", str(tmp_path / "bad"), "--checkpoint", str(tmp_path / "bare.pt"),
                 "--model-config", str(tmp_path / "bad.yaml")]) == 1
    assert "unknown key(s) ['group_sise']" in capsys.readouterr().err


def test_utf16_lists_are_read_and_binary_lists_are_named(tmp_path):
    """Notepad's "Unicode" and PowerShell 5's `>` write UTF-16 with a byte-order mark: the run stopped on
    "embedded null byte", naming neither the list nor the cause, and separated none of the other inputs."""
    sf.write(str(tmp_path / "a.wav"), noise(4000, 1), 16000)
    (tmp_path / "list.txt").write_text("a.wav\r\n", encoding="utf-16")  # (with its byte-order mark)
    (tmp_path / "list32.txt").write_text("a.wav\r\n", encoding="utf-32")  # PowerShell's Out-File -Encoding utf32
    assert collect_inputs([str(tmp_path / "list32.txt")]).files == [tmp_path / "a.wav"]
    (tmp_path / "binary.txt").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt ")
    found = collect_inputs([str(tmp_path / "list.txt"), str(tmp_path / "binary.txt")])
    assert found.files == [tmp_path / "a.wav"]
    assert found.errors == [(str(tmp_path / "binary.txt"), "cannot read the list file: it holds NUL bytes: not a "
                             "text list (binary, or UTF-16 without a byte-order mark: save it as UTF-8)")]


def test_a_missing_list_entry_keeps_the_layout_the_list_gives_once_it_arrives(ckpt, tmp_path, monkeypatch):
    """Relative entries found in the current folder, and one not there yet: it was looked up in the list's folder,
    which moved the outputs' common folder, so the rerun after it arrived separated a.wav again elsewhere."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "lists").mkdir()
    sf.write(str(tmp_path / "data" / "a.wav"), noise(4000, 1), 16000)
    (tmp_path / "lists" / "todo.txt").write_text("data/a.wav\ndata/b.wav\n")
    assert collect_inputs(["lists/todo.txt"]).files == [tmp_path / "data" / "a.wav", tmp_path / "data" / "b.wav"]
    run = ["separate", "lists/todo.txt", "-o", "out", "--checkpoint", str(ckpt), "-q"]
    assert main(run) == 1  # b.wav missing
    sf.write(str(tmp_path / "data" / "b.wav"), noise(4000, 2), 16000)
    assert main(run) == 0
    assert outputs_under(tmp_path / "out") == ["a_s1.wav", "a_s2.wav", "b_s1.wav", "b_s2.wav"]


def test_each_long_input_is_freed_once_at_the_model_rate_unless_plotted(ckpt, tmp_path, monkeypatch):
    """The command kept every decoded input alive beside its outputs (1.2 GB more at the peak for an hour of
    44.1 kHz stereo); only --plot needs it."""
    pytest.importorskip("matplotlib")
    from tests.separation.test_separation import _input_alive_during_separation

    alive = _input_alive_during_separation(monkeypatch)
    sf.write(str(tmp_path / "a.wav"), noise(3 * 44100, channels=2), 44100)
    assert main(["separate", str(tmp_path / "a.wav"), "-o", str(tmp_path / "out"), "--checkpoint", str(ckpt),
                 "-q"]) == 0
    assert main(["separate", str(tmp_path / "a.wav"), "-o", str(tmp_path / "plotted"), "--checkpoint", str(ckpt),
                 "--plot", "-q"]) == 0
    assert alive == [False, True]
    assert (tmp_path / "plotted" / "a_spectrogram.png").is_file()


def test_an_output_may_not_replace_the_file_an_input_link_points_to(tmp_path):
    """b.wav links to out/a_s1.wav; a.wav's first output is out/a_s1.wav: writing it would change b's audio."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "a_s1.wav"
    target.write_bytes(b"RIFF")
    (tmp_path / "in" / "a.wav").write_bytes(b"RIFF")
    os.symlink(target, tmp_path / "in" / "b.wav")
    files = [tmp_path / "in" / "a.wav", tmp_path / "in" / "b.wav"]
    plan = {f: [tmp_path / "out" / f"{f.stem}_s{k}.wav" for k in (1, 2)] for f in files}
    with pytest.raises(ValueError, match=r"refusing to overwrite inputs: .*a_s1\.wav, an output of a\.wav"):
        check_plan(files, plan, "PCM_16")


def _touch(*paths: Path) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_plot_with_every_output_and_its_spectrogram_present_skips_without_redrawing(tmp_path):
    """--plot where the spectrogram exists too: skipped as done, not queued to draw the spectrogram again."""
    from mossformer2.cli.separate_plan import select_work

    f = tmp_path / "a.wav"
    outputs = [tmp_path / "out" / "a_s1.wav", tmp_path / "out" / "a_s2.wav"]
    _touch(f, *outputs, tmp_path / "out" / "a_spectrogram.png")
    said: list[str] = []
    work = select_work([f], {f: outputs}, {}, overwrite=False, plot=True, say=said.append)
    assert (work.todo, work.plot_only, work.skipped, work.failed) == ([], [], 1, [])
    assert "use --overwrite to replace" in said[0]


def test_a_many_channel_input_mixed_down_to_mono_may_be_written_as_flac(tmp_path):
    """FLAC holds at most 8 channels: a 10-channel recording is refused only with --channels each."""
    from types import SimpleNamespace

    from mossformer2.cli.separate_plan import check_outputs_writable

    f = tmp_path / "array.flac"
    plan = {f: [tmp_path / "array_s1.flac", tmp_path / "array_s2.flac"]}
    infos = {f: SimpleNamespace(channels=10, samplerate=16000, frames=16000)}
    check_outputs_writable(plan, infos, "mix", None, "PCM_16")
    with pytest.raises(ValueError, match="1 of 1 input"):
        check_outputs_writable(plan, infos, "each", None, "PCM_16")


def _quiet_separator(**options):
    from mossformer2.separation import Separator
    from tests.separation.test_separation import LouderBandFirst

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Separator(options.pop("model", None) or LouderBandFirst(), **options)


def test_chunk_settings_that_do_not_fit_a_fixed_length_export_are_refused_once_up_front(tmp_path):
    """Not file after file: one message before any work; a file shorter than the export only fails alone."""
    from types import SimpleNamespace

    from mossformer2.cli.separate_plan import too_short_for_export
    from tests.separation.test_separation import SR, LouderBandFirst

    export = LouderBandFirst(input_shape=[1, 4 * SR])
    infos = {tmp_path / "long.wav": SimpleNamespace(frames=10 * SR, samplerate=SR, channels=1),
             tmp_path / "short.wav": SimpleNamespace(frames=SR, samplerate=SR, channels=1)}
    with pytest.raises(ValueError, match=r"--chunk-seconds 5 / --overlap-seconds 1 do not fit the export: 1 of 2"):
        too_short_for_export(_quiet_separator(model=export, chunk_seconds=5, overlap_seconds=1), infos, 5, 1)
    fitting = too_short_for_export(_quiet_separator(model=export), infos, 10.0, 2.0)
    assert list(fitting) == [tmp_path / "short.wav"]


def test_files_exactly_one_chunk_long_are_batched_together(tmp_path):
    from types import SimpleNamespace

    from mossformer2.cli.separate_plan import batch_groups
    from tests.separation.test_separation import SR

    sep = _quiet_separator(chunk_seconds=0.5, overlap_seconds=0.25, batch_size=2)
    infos = {tmp_path / n: SimpleNamespace(frames=SR // 2, samplerate=SR, channels=1) for n in ("a.wav", "b.wav")}
    assert batch_groups(infos, sep) == [[tmp_path / "a.wav", tmp_path / "b.wav"]]


def test_clearvoice_stitching_reads_and_separates_files_one_at_a_time(tmp_path):
    """Its windows run per file: a batch would only hold several decoded files in memory at once."""
    from types import SimpleNamespace

    from mossformer2.cli.separate_plan import batch_groups
    from tests.separation.test_separation import SR

    sep = _quiet_separator(stitching="clearvoice", batch_size=2)
    infos = {tmp_path / n: SimpleNamespace(frames=SR, samplerate=SR, channels=1) for n in ("a.wav", "b.wav")}
    assert batch_groups(infos, sep) == [[tmp_path / "a.wav"], [tmp_path / "b.wav"]]


def test_a_file_that_fails_inside_a_batch_fails_alone(ckpt, tmp_path, capsys):
    """--batch-size 2 with a too-short file beside a good one: the batch is retried one by one, so the good file
    is separated and only the short one is listed as failed."""
    data = tmp_path / "d"
    data.mkdir()
    sf.write(str(data / "good.wav"), noise(8000, 1), 16000)
    sf.write(str(data / "tiny.wav"), noise(5, 2), 16000)
    out = tmp_path / "out"
    code = main(["separate", str(data), "-o", str(out), "--checkpoint", str(ckpt), "--batch-size", "2"])
    captured = capsys.readouterr()
    assert code == 1 and "separated 1 file(s), skipped 0, failed 1" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["good_s1.wav", "good_s2.wav"]
    assert any(ln.startswith("failed:") and "tiny.wav" in ln and "too short" in ln for ln in captured.err.splitlines())


def test_output_rate_input_is_case_insensitive():
    from mossformer2.cli.separate import _parse_output_rate

    assert _parse_output_rate("Input") is None and _parse_output_rate("INPUT") is None
    assert _parse_output_rate("16000") == 16000


def test_only_a_file_beside_its_input_counts_as_an_earlier_output(tmp_path):
    """b/a_s1.wav is not an output of a/a.wav: another folder's recording is separated, not skipped."""
    from mossformer2.cli.input_files import outputs_beside_inputs

    a, other, beside = tmp_path / "a" / "a.wav", tmp_path / "b" / "a_s1.wav", tmp_path / "a" / "a_s1.wav"
    assert outputs_beside_inputs([a, other]) == set()
    assert outputs_beside_inputs([a, other, beside]) == {beside}


def test_a_glob_that_climbs_above_its_folder_mirrors_from_the_files_folder(tmp_path):
    """'data/*/../../x.wav' names tmp/x.wav, above the pattern's folder data/: the layout still has a root."""
    from mossformer2.cli.input_files import mirrored_out_dirs

    x = tmp_path / "x.wav"
    assert mirrored_out_dirs([x], tmp_path / "out", [tmp_path / "data"]) == {x: tmp_path / "out"}


def test_a_list_file_with_an_upper_case_extension_is_read_as_a_list(tmp_path):
    from mossformer2.cli.input_files import collect_inputs

    audio = tmp_path / "talk.wav"
    sf.write(str(audio), noise(800, 1), 16000)
    listing = tmp_path / "FILES.TXT"
    listing.write_text(f"{audio}\n")
    found = collect_inputs([str(listing)])
    assert found.files == [audio] and found.errors == []

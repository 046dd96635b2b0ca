"""Separator with a tiny random MossFormer2: shapes, rates, channels, chunking, batching, dtypes, levels, errors."""

from __future__ import annotations

import copy
import pickle
import tracemalloc
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import mossformer2
import mossformer2.pretrained
from mossformer2 import build_model, save_checkpoint
from mossformer2.audio import read_audio, write_audio
from mossformer2.losses import si_sdr
from mossformer2.separation import Separator, write_separation
from mossformer2.separation.batching import equal_length_batches, length_sorted_batches, make_batches
from mossformer2.separation.cuda_graphs import CudaGraphModel
from mossformer2.separation.separator import TARGET_PEAK, TARGET_RMS
from tests.conftest import make_tiny_config

SR = 16000


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(make_tiny_config()).eval()


def noise(shape, seed=0, scale=0.1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


class LinearModel(torch.nn.Module):
    """``[B, T] -> [B, 2, T]`` = (0.25 x, 0.75 x); records the inputs it saw."""

    def __init__(self, record: bool = True):
        super().__init__()
        self.config = make_tiny_config()
        self.record = record
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        if self.record:
            self.seen.append(x.clone())
        return torch.stack([0.25 * x, 0.75 * x], dim=1)


def record_lengths(model) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    return shapes


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
def test_any_rate_returns_input_rate_and_length(tiny_model, rate):
    sep = Separator(tiny_model, device="cpu")
    x = noise(int(rate * 0.6))
    out = sep.separate(x, rate)
    assert out.shape == (2, x.shape[0]) and out.dtype == np.float32 and np.isfinite(out).all()
    out16 = sep.separate(x, rate, output_rate=16000)
    assert abs(out16.shape[-1] - int(0.6 * 16000)) <= 1


@pytest.mark.parametrize(("samples", "rate", "out_rate", "expected"),
                         [(221, 22050, 44100, 442), (481, 48000, 44100, 442), (12345, 11025, 44100, 49380)])
def test_another_output_rate_gives_the_input_length_at_that_rate(tiny_model, samples, rate, out_rate, expected):
    """Through the model rate the length was rounded twice (221 samples at 22.05 kHz -> 441 at 44.1 kHz)."""
    out = Separator(tiny_model, device="cpu").separate(noise(samples), rate, output_rate=out_rate)
    assert out.shape == (2, expected)


def test_channels_mix_each_and_torch_input(tiny_model):
    stereo = np.stack([noise(12000, 1), noise(12000, 2)])
    mixed = Separator(tiny_model, device="cpu").separate(torch.from_numpy(stereo), 24000)
    assert isinstance(mixed, torch.Tensor) and mixed.dtype == torch.float32 and mixed.shape == (2, 12000)
    downmix_first = Separator(tiny_model, device="cpu").separate(stereo.mean(0), 24000)
    assert isinstance(downmix_first, np.ndarray)  # the kind of array given comes back
    np.testing.assert_allclose(mixed.numpy(), downmix_first, atol=1e-6)
    many = Separator(tiny_model, device="cpu").separate_many([torch.from_numpy(stereo[0]), stereo[1]], 24000)
    assert isinstance(many[0], torch.Tensor) and isinstance(many[1], np.ndarray)
    each = Separator(tiny_model, device="cpu", channels="each").separate(stereo, 24000)
    assert each.shape == (2, 2, 12000)
    np.testing.assert_allclose(each[:, 1], Separator(tiny_model, device="cpu").separate(stereo[1], 24000),
                               atol=1e-6)
    four = np.stack([noise(8000, k) for k in range(4)])
    four[2] = 0.0  # a silent channel separates into silence instead of failing
    out = Separator(tiny_model, device="cpu", channels="each").separate(four, SR)
    assert out.shape == (2, 4, 8000) and np.all(out[:, 2] == 0) and np.any(out[:, 3] != 0)


def test_long_input_runs_in_chunks_with_bounded_model_input(tiny_model):
    model = build_model(make_tiny_config()).eval()
    shapes = record_lengths(model)
    sep = Separator(model, device="cpu", chunk_seconds=1.0, overlap_seconds=0.25)
    x = noise(int(5.3 * SR))
    out = sep.separate(x, SR)
    assert out.shape == (2, x.shape[0]) and np.isfinite(out).all()
    assert len(shapes) == sep.chunk_count(x.shape[0], SR) == 7
    assert all(s == (1, SR) for s in shapes)  # never the whole file
    short = sep.separate(x[:SR], SR)  # one chunk exactly: a single pass
    assert short.shape == (2, SR) and len(shapes) == 8


def test_memory_is_the_audio_arrays_not_the_length():
    """Peak numpy memory (tracemalloc) of a chunked separation: the normalised input copy plus the S outputs."""
    ratios = []
    for seconds in (30, 120):
        x = noise(seconds * SR, seed=seconds)
        sep = Separator(LinearModel(record=False), device="cpu", chunk_seconds=2.0, overlap_seconds=0.5)
        tracemalloc.start()
        try:
            out = sep.separate(x, SR)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert out.shape == (2, x.shape[0])
        ratios.append(peak / x.nbytes)
    assert max(ratios) < 3.6  # 1 (normalised copy) + 2 (outputs) + one chunk's worth
    assert ratios[1] <= ratios[0] + 0.05  # does not grow with the file length


def test_separate_file_peak_memory_is_input_copy_and_outputs(tmp_path):
    """Reading, separating and writing a file: the read input, its normalised copy and the S outputs (4x the
    input), with no full-size temporaries on top (np.abs for peak checks made it 5x)."""
    x = noise(120 * SR, seed=1)
    sf.write(tmp_path / "in.wav", x, SR, subtype="FLOAT")
    sep = Separator(LinearModel(record=False), device="cpu", chunk_seconds=2.0, overlap_seconds=0.5)
    tracemalloc.start()
    try:
        paths = sep.separate_file(tmp_path / "in.wav", tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(paths) == 2
    assert peak / x.nbytes < 4.5


def test_batched_equals_unbatched(tiny_model):
    x = noise(int(4.5 * SR), seed=3)
    one = Separator(tiny_model, device="cpu", chunk_seconds=1.0, overlap_seconds=0.25, batch_size=1)
    four = Separator(tiny_model, device="cpu", chunk_seconds=1.0, overlap_seconds=0.25, batch_size=4)
    np.testing.assert_allclose(four.separate(x, SR), one.separate(x, SR), atol=1e-6)


def test_short_inputs_are_sorted_by_length_padded_and_exact(tiny_model):
    """Unequal short files share padded forward passes (with their true lengths); outputs equal one-by-one."""
    files = [noise(8000, 1), noise(7000, 2), noise(6000, 3), noise(8000, 4), noise(5555, 5)]
    model = build_model(make_tiny_config()).eval()
    model.load_state_dict(tiny_model.state_dict())
    calls: list[tuple[tuple[int, ...], list[int] | None]] = []
    model.register_forward_pre_hook(
        lambda _m, args: calls.append((tuple(args[0].shape), args[1].tolist() if len(args) > 1 else None)))
    sep = Separator(model, device="cpu", batch_size=3)
    assert sep.pads_batches
    batched = sep.separate_many(files, SR)
    assert calls == [((3, 7000), [5555, 6000, 7000]), ((2, 8000), None)]  # sorted; equal lengths need no mask
    one = Separator(tiny_model, device="cpu", batch_size=1)
    for wave, got in zip(files, batched):
        assert got.shape == (2, wave.shape[0])
        expected = one.separate(wave, SR)
        np.testing.assert_allclose(got, expected, atol=2e-5 * np.abs(expected).max())
    from_generator = sep.separate_many((wave for wave in files), SR)  # an IndexError after all the work
    assert [o.shape for o in from_generator] == [o.shape for o in batched]


def test_models_without_lengths_batch_equal_lengths_only(tiny_model):
    """ONNX graphs and official modules take no lengths: only identical lengths share a pass."""

    class NoLengths(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, wave):
            return self.inner(wave)

    model = NoLengths(tiny_model)
    shapes = record_lengths(model)
    sep = Separator(model, device="cpu", batch_size=3)
    assert not sep.pads_batches
    files = [noise(8000, 1), noise(8000, 2), noise(6000, 3), noise(8000, 4), noise(6000, 5)]
    batched = sep.separate_many(files, SR)
    assert shapes == [(2, 6000), (3, 8000)]
    for wave, got in zip(files, batched):
        np.testing.assert_allclose(got, Separator(tiny_model, device="cpu").separate(wave, SR), atol=1e-6)


def test_zero_padding_without_lengths_would_change_outputs(tiny_model):
    """Why padded batches pass lengths: the network normalises over time, so padding alone is not neutral."""
    x = torch.from_numpy(noise(8000, 7))[None]
    with torch.inference_mode():
        plain = tiny_model(x)
        padded_input = torch.nn.functional.pad(x, (0, 800))
        padded = tiny_model(padded_input)[..., :8000]
        masked = tiny_model(padded_input, torch.tensor([8000]))[..., :8000]
    relative_db = 10 * torch.log10(((plain - padded) ** 2).sum() / (plain**2).sum())
    assert relative_db > -60  # far above float noise (about -28 dB measured)
    assert (plain - masked).abs().max() < 1e-5 * plain.abs().max()


def test_batch_planning():
    assert equal_length_batches([5, 3, 5, 5, 3, 9], 2) == [[1, 4], [0, 2], [3], [5]]
    assert length_sorted_batches([5, 3, 5, 5, 3, 9], 4) == [[1, 4, 0, 2], [3, 5]]
    assert make_batches([5, 3, 9], 2, padded=True) == [[1, 0], [2]]
    assert make_batches([5, 3, 9], 2, padded=False) == [[1], [0], [2]]
    for plan in (equal_length_batches, length_sorted_batches):
        with pytest.raises(ValueError):
            plan([1], 0)


def test_bfloat16_on_cpu_and_float16_fallback(tiny_model):
    x = noise(20000, 4)
    ref = Separator(tiny_model, device="cpu").separate(x, SR)
    bf16 = Separator(tiny_model, device="cpu", dtype="bfloat16").separate(x, SR)
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
    quality = si_sdr(torch.from_numpy(bf16), torch.from_numpy(ref))
    assert quality.min() > 20 and not np.allclose(bf16, ref, atol=1e-7)  # really ran in bf16, close to fp32
    with pytest.warns(UserWarning, match="float16 inference needs CUDA"):
        fp16 = Separator(tiny_model, device="cpu", dtype="float16")
    assert fp16.dtype == torch.float32
    np.testing.assert_allclose(fp16.separate(x, SR), ref, atol=1e-6)


def test_models_cast_to_half_precision_get_their_input_dtype(tiny_model):
    """A model cast with .bfloat16() separates (its input is cast to match) close to the fp32 model; a .half()
    model on the CPU is cast back to float32 with a warning (the CPU's fp16 convolutions all but hang)."""
    import copy

    x = noise(20000, 4)
    ref = Separator(tiny_model, device="cpu").separate(x, SR)
    bf16 = Separator(copy.deepcopy(tiny_model).bfloat16(), device="cpu").separate(x, SR)
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
    assert si_sdr(torch.from_numpy(bf16), torch.from_numpy(ref)).min() > 20
    assert not np.allclose(bf16, ref, atol=1e-7)  # really ran in bf16
    with pytest.warns(UserWarning, match="a float16 model needs CUDA"):
        fp16 = Separator(copy.deepcopy(tiny_model).half(), device="cpu")
    assert fp16.input_dtype == torch.float32
    # Only the weights' fp16 rounding remains (32 dB on this random model).
    assert si_sdr(torch.from_numpy(fp16.separate(x, SR)), torch.from_numpy(ref)).min() > 25


@pytest.mark.parametrize("normalize", ["rms", "peak", "none"])
def test_normalisation_feeds_target_level_and_restores_input_level(normalize):
    model = LinearModel()
    x = noise(16000, 5, scale=0.3) + 0.05
    out = Separator(model, device="cpu", normalize=normalize).separate(x, SR)
    np.testing.assert_allclose(out[0] + out[1], x, atol=1e-5)
    np.testing.assert_allclose(out[1], 3 * out[0], atol=1e-5)
    seen = model.seen[-1]
    if normalize == "rms":
        assert abs(float(seen.pow(2).mean().sqrt()) - TARGET_RMS) < 1e-4
    elif normalize == "peak":
        assert abs(float(seen.abs().max()) - TARGET_PEAK) < 1e-5
    else:
        np.testing.assert_array_equal(seen[0].numpy(), x)


def test_bad_input_gives_clear_errors(tiny_model):
    sep = Separator(tiny_model, device="cpu")
    cases = [(np.array([0.1, np.nan] * 100, np.float32), "NaN or infinite"),
             (np.array([0.1, np.inf] * 100, np.float32), "NaN or infinite"),
             (np.zeros(0, np.float32), "empty"),
             (noise(10), "too short"),
             (noise((4000, 2)), "channels first"),
             (noise((2, 3, 100)), r"\[T\] or \[C, T\]"),
             (noise(4000).astype(np.float64) * 1e300, r"reach .*e\+299, beyond float32's range")]  # not "NaN"
    for wave, message in cases:
        with pytest.raises(ValueError, match=message):
            sep.separate(wave, SR)
    # Below float32's smallest normal number it is silence: the level gain overflowed to "NaN or infinite".
    # (the last: RMS 1e-40, so -25 dBFS needs a gain past float32's range, which MAX_GAIN caps)
    for denormal in (np.full(4000, 1e-40, np.float32), np.r_[np.full(4000, 1e-40, np.float32), 2e-38],
                     np.r_[np.full(16000, 1e-44, np.float32), 1.2e-38]):
        out = sep.separate(denormal.astype(np.float32), SR)
        assert np.isfinite(out).all() and np.abs(out).max() < 1e-30
    assert "all silent" in sep.nothing_to_separate(np.full((1, 4000), 1e-40, np.float32))
    assert sep.nothing_to_separate(np.full((1, 4000), 1e-30, np.float32)) is None
    with pytest.raises(ValueError, match="sample_rate"):
        sep.separate(noise(4000), 0)
    # A path (as SpeechBrain's separate_file or Asteroid's separate take) was "audio of dtype <U7".
    for path in ("mix.wav", Path("mix.wav")):
        with pytest.raises(TypeError, match=r"^separate\(\) takes audio samples, not a file \('mix.wav'\): "
                                            r"separate_file\(path, out_dir\)"):
            sep.separate(path, SR)
        with pytest.raises(TypeError, match=r"^separate_many\(\) takes audio samples, not a file \('mix.wav'\)"):
            sep.separate_many(path, SR)  # (not its characters, one by one)
    with pytest.raises(TypeError, match=r"^separate_many\(\) takes .* \('b.wav'\)"):
        sep.separate_many([noise(4000), "b.wav"], SR)


def test_a_model_returning_nan_is_named_not_a_matrix_error(tiny_model):
    """A diverged checkpoint (or an fp16 overflow) gave scipy's "matrix contains invalid numeric entries" from the
    refinements' speaker matching, or NaN audio without them."""
    broken = copy.deepcopy(tiny_model)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    for options in ({}, {"polarity_ensemble": False, "wiener_filter": False, "mixture_consistency": False},
                    {"chunk_seconds": 0.5, "overlap_seconds": 0.25}):
        sep = Separator(broken, device="cpu", **options)
        with pytest.raises(ValueError, match="^the model returned NaN or infinite values: its weights may hold"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (a short overlap)
                sep.separate(noise(SR), SR)


def test_bad_options_are_rejected(tiny_model):
    for kwargs, message in [({"stitching": "magic"}, "stitching"), ({"normalize": "loud"}, "normalize"),
                            ({"channels": "left"}, "channels"), ({"chunk_seconds": 1, "overlap_seconds": 1},
                                                                 "overlap"),
                            ({"batch_size": 0}, "batch_size"), ({"dtype": "int8"}, "dtype"),
                            ({"backend": "onnxruntime"}, "onnx"), ({"device": "tpu"}, "device"),
                            ({"chunk_seconds": float("inf")}, "finite"),  # was an OverflowError traceback
                            # aligned stitching matches speakers on the overlap: with none they swapped silently
                            ({"overlap_seconds": 0}, "--overlap-seconds.* above 0"),
                            # equal, or none, once rounded to samples: every file failed alone, or the chunks
                            # were joined unmatched without a warning
                            ({"chunk_seconds": 1.00001, "overlap_seconds": 1}, "16000 and 16000 samples at"),
                            ({"chunk_seconds": 3, "overlap_seconds": 1e-7}, "under one sample"),
                            ({"overlap_seconds": None}, "overlap_seconds .* must be a finite"),  # were TypeErrors
                            # unused without chunks, but inf was an OverflowError traceback there
                            ({"chunk_seconds": None, "overlap_seconds": float("inf")}, "must be a finite number"),
                            ({"chunk_seconds": None, "overlap_seconds": float("nan")}, "must be a finite number"),
                            ({"chunk_seconds": "10"}, "chunk_seconds must be a number"),  # 2.5 batches: taken as 2
                            ({"batch_size": 2.5}, r"batch_size \(--batch-size\) must be a whole number")]:
        with pytest.raises(ValueError, match=message):
            Separator(tiny_model, **kwargs)
    with pytest.raises(ValueError, match="config"):
        Separator(lambda x: x)
    # refused before the model is prepared, which casts (and moves, compiles) the caller's model in place
    half = copy.deepcopy(tiny_model).half()
    for bad in ({"chunk_seconds": 1, "overlap_seconds": 2}, {"chunk_seconds": 4, "overlap_seconds": 0}):
        with pytest.raises(ValueError, match="overlap_seconds"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Separator(half, device="cpu", **bad)
        assert next(half.parameters()).dtype == torch.float16
    with pytest.raises(TypeError, match=r"takes a model, not a file \('m.pt'\): Separator.from_pretrained\(path\)"):
        Separator("m.pt")  # (from_pretrained takes paths)
    whole = Separator(tiny_model, chunk_seconds=None)  # its settings make it again (overlap_seconds is None then)
    assert Separator(tiny_model, chunk_seconds=whole.chunk_seconds, overlap_seconds=whole.overlap_seconds).chunk == (
        whole.chunk)
    with pytest.warns(UserWarning, match="fixed 2 s windows: chunk_seconds and overlap_seconds .* are not used"):
        Separator(tiny_model, stitching="clearvoice", overlap_seconds=0)  # its windows have their own overlap


def test_channels_that_cancel_in_the_downmix_are_warned_about(tiny_model):
    x = noise(8000)
    sep = Separator(tiny_model, device="cpu")
    with pytest.warns(UserWarning, match="channels cancel.*--channels each"):
        sep.separate(np.stack([x, -x]), SR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sep.separate(np.stack([x, 0.5 * x]), SR)
        Separator(tiny_model, device="cpu", channels="each").separate(np.stack([x, -x]), SR)


def test_separate_file_writes_all_speakers_and_plot(tiny_model, tmp_path):
    src = tmp_path / "in" / "meeting.flac"
    src.parent.mkdir()
    sf.write(str(src), np.stack([noise(22050, 1), noise(22050, 2)]).T, 22050, subtype="PCM_16")
    sep = Separator(tiny_model, device="cpu")
    paths = sep.separate_file(src, tmp_path / "out", plot=True)
    assert [p.name for p in paths] == ["meeting_s1.flac", "meeting_s2.flac", "meeting_spectrogram.png"]
    for p in paths[:2]:
        wave, rate = read_audio(p)
        assert rate == 22050 and wave.shape == (1, 22050)
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wav_paths = sep.separate_file(src, tmp_path / "out16", output_rate=16000, format="wav", subtype="FLOAT")
    assert sf.info(str(wav_paths[0])).samplerate == 16000 and sf.info(str(wav_paths[0])).subtype == "FLOAT"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)
    with pytest.raises(ValueError, match="output format must be one of"):  # it wrote .wav files instead
        sep.separate_file(src, tmp_path / "ogg", format="ogg")
    # overwrite=False keeps what is there, as `separate` does without --overwrite (a spectrogram only with plot)
    before = {p: p.stat().st_mtime_ns for p in paths}
    with pytest.raises(FileExistsError, match=r"meeting_s1.flac exists \(overwrite=True replaces it\)"):
        sep.separate_file(src, tmp_path / "out", overwrite=False)
    assert {p: p.stat().st_mtime_ns for p in paths} == before
    paths[0].unlink()
    paths[1].unlink()
    with pytest.raises(FileExistsError, match="meeting_spectrogram.png exists"):
        sep.separate_file(src, tmp_path / "out", overwrite=False, plot=True)
    assert len(sep.separate_file(src, tmp_path / "out", overwrite=False)) == 2


def test_write_separation_is_all_or_nothing(tmp_path):
    sources = noise((2, 1000))
    sources[1, 10] = np.nan  # the second file cannot be written
    paths = [tmp_path / "a_s1.wav", tmp_path / "a_s2.wav"]
    with pytest.raises(ValueError, match="NaN") as caught:
        write_separation(paths, sources, SR)
    assert str(paths[1]) in str(caught.value) and ".tmp" not in str(caught.value)  # the file, not its temp
    assert list(tmp_path.iterdir()) == []
    write_audio(paths[0], np.full(100, 0.5, np.float32), SR)
    with pytest.raises(ValueError):
        write_separation(paths, sources, SR)
    assert [p.name for p in tmp_path.iterdir()] == ["a_s1.wav"]
    np.testing.assert_allclose(read_audio(paths[0])[0], 0.5, atol=1e-4)  # the old file is untouched
    with pytest.warns(UserWarning, match=r"^a_s1\.wav, a_s2\.wav: outputs peak at 2\.000.*scaled by 0\.495"):
        write_separation(paths, np.stack([np.full(100, 0.5), np.full(100, -2.0)]).astype(np.float32), SR)
    # One gain for both speakers (neither wrapped nor clipped): their level ratio stays 0.5 / 2.
    np.testing.assert_allclose(read_audio(paths[1])[0], -0.99, atol=1e-4)
    np.testing.assert_allclose(read_audio(paths[0])[0], 0.2475, atol=1e-4)
    # Sources and paths must pair up: one source too few made an empty third file that a rerun took as done.
    with pytest.raises(ValueError, match="2 separated sources for 3 output paths"):
        write_separation([*paths, tmp_path / "a_s3.wav"], sources[:, :100] * 0, SR)
    assert not (tmp_path / "a_s3.wav").exists()


def test_from_pretrained_file_and_default(tiny_model, tmp_path, monkeypatch):
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, tiny_model)
    x = noise(6000, 8)
    want = Separator(tiny_model, device="cpu").separate(x, SR)
    np.testing.assert_allclose(Separator.from_pretrained(ckpt, device="cpu").separate(x, SR), want, atol=1e-6)
    monkeypatch.setattr(mossformer2.pretrained, "DEFAULT_MODEL_FILE", ckpt)
    np.testing.assert_allclose(Separator.from_pretrained(None, device="cpu").separate(x, SR), want, atol=1e-6)


def test_progress_bar_over_chunks(tiny_model, capsys):
    Separator(tiny_model, device="cpu", chunk_seconds=0.5, overlap_seconds=0.1, progress=True).separate(
        noise(int(1.2 * SR)), SR)
    assert "chunks" in capsys.readouterr().err


def test_bfloat16_padded_batch_stays_close_to_float32(tiny_model):
    files = [noise(5000, 1), noise(7000, 2), noise(8000, 3)]
    bf16 = Separator(tiny_model, device="cpu", dtype="bfloat16", batch_size=3).separate_many(files, SR)
    fp32 = Separator(tiny_model, device="cpu", batch_size=1).separate_many(files, SR)
    for got, ref in zip(bf16, fp32):
        snr = 10 * np.log10((ref**2).sum() / ((got - ref) ** 2).sum())
        assert snr > 25  # about 41 dB measured


def test_cuda_graph_runner_runs_eagerly_where_graphs_do_not_apply(tiny_model):
    wave = torch.from_numpy(noise((2, 6000), 21))
    runner = CudaGraphModel(tiny_model, max_graphs=2)
    with torch.inference_mode():
        expected = tiny_model(wave)
        assert torch.equal(runner(wave), expected)  # CPU tensors: eager
        lengths = torch.tensor([6000, 4000])
        assert torch.equal(runner(wave, lengths), tiny_model(wave, lengths))  # padded batches: eager
    assert runner.captured_shapes == [] and runner.config is tiny_model.config
    out = runner(wave)  # gradients enabled: eager, differentiable
    assert out.requires_grad
    with pytest.raises(ValueError, match="max_graphs"):
        CudaGraphModel(tiny_model, max_graphs=0)


def test_cuda_graph_runner_applies_its_autocast_dtype(tiny_model):
    wave = torch.from_numpy(noise((1, 6000), 22))
    with torch.inference_mode():
        out = CudaGraphModel(tiny_model, torch.bfloat16)(wave)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = tiny_model(wave)
    assert torch.equal(out, expected)


def test_cuda_graphs_option_is_ignored_on_cpu(tiny_model):
    wave = noise(40000, 23)
    with pytest.warns(UserWarning, match="applies on CUDA only; ignored on cpu"):
        sep = Separator(tiny_model, device="cpu", chunk_seconds=1.0, overlap_seconds=0.25, cuda_graphs=True)
    assert sep.graphs is None
    expected = Separator(tiny_model, device="cpu", chunk_seconds=1.0, overlap_seconds=0.25).separate(wave, SR)
    np.testing.assert_array_equal(sep.separate(wave, SR), expected)


class LouderBandFirst:
    """A deterministic NumPy "model" ``[B, T] -> [B, 2, T]``: the spectrum below and above 2 kHz, the louder part
    first (a network's output order is arbitrary per pass; here it follows the input's balance)."""

    def __init__(self, input_shape=None):
        self.config = make_tiny_config()
        if input_shape is not None:
            self.input_shape = input_shape  # as an ONNX export of a fixed length

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        spec = np.fft.rfft(batch, axis=-1)
        low_bins = np.fft.rfftfreq(batch.shape[-1], 1 / SR) < 2000
        low = np.fft.irfft(spec * low_bins, n=batch.shape[-1], axis=-1)
        out = np.stack([low, batch - low], axis=1)
        high_louder = np.square(out[:, 1]).sum(-1) > np.square(out[:, 0]).sum(-1)
        out[high_louder] = out[high_louder, ::-1]
        return out.astype(np.float32)


class NegatesHighLouder(LouderBandFirst):
    """:class:`LouderBandFirst`, with the outputs of inputs whose high band is louder negated."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = super().__call__(batch)
        power = np.abs(np.fft.rfft(batch, axis=-1)) ** 2
        high = np.fft.rfftfreq(batch.shape[-1], 1 / SR) >= 2000
        out[power[:, high].sum(-1) > power[:, ~high].sum(-1)] *= -1
        return out


class NegatesHighWhenLoud(LouderBandFirst):
    """Low band, high band in that order; the high band negated for inputs with an RMS above 0.5."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        low_bins = np.fft.rfftfreq(batch.shape[-1], 1 / SR) < 2000
        low = np.fft.irfft(np.fft.rfft(batch, axis=-1) * low_bins, n=batch.shape[-1], axis=-1)
        out = np.stack([low, batch - low], axis=1)
        out[np.sqrt(np.mean(batch**2, axis=-1)) > 0.5, 1] *= -1
        return out.astype(np.float32)


@pytest.mark.parametrize("refinements", [{}, {"wiener_filter": True}])
def test_channels_each_share_the_first_channels_speaker_order_and_keep_their_recorded_polarity(refinements):
    t = np.arange(SR) / SR
    low, high = np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 3000 * t)
    # Left: the low voice louder; right: the high voice louder and the polarity reversed (a mic wired in reverse).
    # The model puts the louder voice first, so each channel on its own has another order.
    stereo = np.stack([low + 0.3 * high, -(0.3 * low + high)]).astype(np.float32)
    out = Separator(LouderBandFirst(), channels="each", normalize="none", **refinements).separate(stereo, SR)
    assert out.shape == (2, 2, SR)
    assert np.corrcoef(out[0, 0], low)[0, 1] > 0.99 and np.corrcoef(out[1, 0], high)[0, 1] > 0.99
    # Reordered, not negated: the right channel's speakers as it recorded them (they sum to it).
    assert np.corrcoef(out[0, 1], -low)[0, 1] > 0.99 and np.corrcoef(out[1, 1], -high)[0, 1] > 0.99
    np.testing.assert_allclose(out[:, 1].sum(0), stereo[1], atol=1e-3)
    # A spaced pair: the right mic hears the low voice half a period later (anti-correlated with the left) and the
    # high voice louder; the right channel's low voice stays delayed, not negated.
    delay = 27  # samples: 0.51 periods of 300 Hz
    spaced = np.stack([low + 0.3 * high, 0.3 * np.roll(low, delay) + high]).astype(np.float32)
    out = Separator(LouderBandFirst(), channels="each", normalize="none", **refinements).separate(spaced, SR)
    assert np.corrcoef(out[0, 1], np.roll(low, delay))[0, 1] > 0.99
    assert np.corrcoef(out[1, 1], high)[0, 1] > 0.99
    # A model's sign is arbitrary per pass (SI-SDR training): one that negates the right channel's outputs gets
    # them back as recorded, relative to its input as the first channel's are to theirs.
    flipped = Separator(NegatesHighLouder(), channels="each", normalize="none", **refinements).separate(stereo, SR)
    np.testing.assert_allclose(flipped, Separator(LouderBandFirst(), channels="each", normalize="none",
                                                  **refinements).separate(stereo, SR), atol=1e-4)
    # ... also a speaker too quiet in its channel for that (-25 dB): through the channels' own correlation.
    quiet = 0.056 * high
    alike = np.stack([0.6 * (low + quiet), 0.9 * (low + quiet)]).astype(np.float32)  # RMS 0.42 and 0.64
    out = Separator(NegatesHighWhenLoud(), channels="each", normalize="none", **refinements).separate(alike, SR)
    assert np.corrcoef(out[1, 1], out[1, 0])[0, 1] > 0.99


def test_clearvoice_stitching_keeps_the_channels_independent():
    t = np.arange(SR) / SR
    low, high = np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 3000 * t)
    stereo = np.stack([low + 0.3 * high, -(0.3 * low + high)]).astype(np.float32)
    # --stitching clearvoice keeps the official tool's independent channels (documented).
    official = Separator(LouderBandFirst(), channels="each", stitching="clearvoice").separate(stereo, SR)
    assert np.corrcoef(official[0, 1], high)[0, 1] < -0.99


def test_short_overlaps_are_warned_about_and_the_fixed_length_advice_is_safe(tiny_model):
    with pytest.warns(UserWarning, match=r"overlap_seconds=0\.5 .* under 1 s: .*speakers may swap"):
        Separator(tiny_model, device="cpu", overlap_seconds=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Separator(tiny_model, device="cpu", overlap_seconds=1.0)
        Separator(tiny_model, device="cpu", stitching="clearvoice")  # no matching there
    # A fixed-length export chunks by its own length unless told otherwise; other settings get advice.
    own = dict(chunk_seconds=5, overlap_seconds=1)
    fixed = Separator(LouderBandFirst(input_shape=[1, 4 * SR]), **own)
    advice = fixed.fixed_length_error(10 * SR, SR)
    assert "--chunk-seconds 4 --overlap-seconds 2)" in advice  # half the chunk, the default 2 s
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chunked = Separator(LouderBandFirst(input_shape=[1, 4 * SR]), chunk_seconds=4, overlap_seconds=2)
        by_default = Separator(LouderBandFirst(input_shape=[1, 4 * SR]))
    assert chunked.fixed_length_error(10 * SR, SR) is None and by_default.fixed_length_error(10 * SR, SR) is None
    # shorter than the export: no chunking option helps, so none is suggested (it repeated the user's own options)
    shorter = Separator(LouderBandFirst(input_shape=[1, 20 * SR])).fixed_length_error(SR, SR)
    assert "(1 s at 16000 Hz) is shorter than the fixed input length" in shorter and "--chunk-seconds" not in shorter
    assert "--overlap-seconds 2)" in Separator(LouderBandFirst(input_shape=[1, 20 * SR]), **own).fixed_length_error(
        30 * SR, SR)
    short = Separator(LouderBandFirst(input_shape=[1, SR]), **own).fixed_length_error(3 * SR, SR)
    assert "--overlap-seconds 0.5; an export this short" in short and "longer --length-seconds" in short
    with pytest.warns(UserWarning, match="overlap by 0.5 s only"):  # chunking by a 1 s export's length
        Separator(LouderBandFirst(input_shape=[1, SR]))


def test_integer_pcm_is_scaled_like_files_and_bad_rates_are_refused():
    sep = Separator(LinearModel(record=False), device="cpu", normalize="none")  # sources: 0.25 x and 0.75 x
    x = noise(4000, 5, scale=0.3)
    pcm16 = np.round(x * 32767).astype(np.int16)
    expected = sep.separate(pcm16 / 32768.0, SR)
    for pcm in (pcm16, pcm16.astype(np.int32) << 16, torch.from_numpy(pcm16)):
        np.testing.assert_allclose(sep.separate(pcm, SR), expected, atol=1e-6)
    pcm8 = (np.round(x * 127) + 128).astype(np.uint8)
    np.testing.assert_allclose(sep.separate(pcm8, SR)[0], 0.25 * (pcm8 - 128.0) / 128, atol=1e-6)
    for rate in (None, 0, -16000, 16000.5, float("nan"), "16000", 2**31):
        with pytest.raises(ValueError, match=r"sample_rate must be a whole number of Hz from 1000 to 768000"):
            sep.separate(x, rate)
    with pytest.raises(ValueError, match=r"to 768000 \(e.g. 16000\), got 7: a file with a broken header\?"):
        sep.separate(x, 7)  # a 7 Hz "recording" was separated as 100 s of audio
    for rate in (0, -8000, 999, 768_001):
        with pytest.raises(ValueError, match=r"output_rate must be a whole number of Hz from 1000 to 768000 "
                                             r"\(e.g. 16000\), got -?\d+$"):  # no header to blame
            sep.separate(x, SR, output_rate=rate)
    assert sep.separate(x, 16000.0, output_rate=np.int64(8000)).shape == (2, 2000)
    assert sep.separate(x, torch.tensor(16000), output_rate=torch.tensor(8000)).shape == (2, 2000)


def test_the_spectrogram_appears_together_with_the_speaker_files(tmp_path, monkeypatch):
    """Ctrl-C while the plot is drawn (the slowest part of writing) leaves neither plot nor speaker files."""
    import mossformer2.plotting

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mossformer2.plotting, "plot_separation", interrupted)
    paths = [tmp_path / "a_s1.wav", tmp_path / "a_s2.wav"]
    with pytest.raises(KeyboardInterrupt):
        write_separation(paths, noise((2, 1000)), SR, plot_mixture=(noise((1, 1000)), SR))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    written = write_separation(paths, noise((2, 1000)), SR, plot_mixture=(noise((1, 1000)), SR), title="a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_s1.wav", "a_s2.wav", "a_spectrogram.png"]
    assert written == [*paths, tmp_path / "a_spectrogram.png"]
    # A full disk while drawing: the message names the spectrogram (it said only "No space left on device").
    import matplotlib.figure

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", disk_full)
    for path in tmp_path.iterdir():
        path.unlink()
    with pytest.raises(OSError, match=r"^cannot write .*a_spectrogram\.png: No space left on device$") as caught:
        write_separation(paths, noise((2, 1000)), SR, plot_mixture=(noise((1, 1000)), SR))
    assert caught.value.errno == 28
    assert list(tmp_path.iterdir()) == []


def test_a_separator_leaves_the_callers_train_flag_alone_and_separates_in_eval_mode(tiny_config):
    """Built inside a training loop for validation, a Separator switched the model to eval for the rest of the
    training (no dropout), and after the user's model.train() it separated with dropout on (outputs changed
    from call to call). Each forward pass now runs in eval mode and restores the flag."""
    model = mossformer2.build_model(tiny_config.replace(dropout=0.5))  # training mode, as built
    sep = Separator(model, device="cpu", chunk_seconds=10.0)
    assert model.training
    x = noise(8000, seed=4)
    torch.manual_seed(0)
    first = sep.separate(x, SR)
    torch.manual_seed(1)
    np.testing.assert_array_equal(sep.separate(x, SR), first)  # no dropout inside separate
    assert model.training
    # From several threads at once, through one Separator or two on the same model: one thread's exit switched
    # dropout back on during another's pass.
    from concurrent.futures import ThreadPoolExecutor

    inputs = [noise(8000 + 731 * i, seed=i) for i in range(8)]
    alone = [sep.separate(x, SR) for x in inputs]
    separators = [sep, sep, Separator(model, device="cpu", chunk_seconds=10.0)]
    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda i: separators[i % 3].separate(inputs[i], SR), range(len(inputs))))
        for a, b in zip(alone, together):
            np.testing.assert_array_equal(a, b)
    assert model.training
    copied = pickle.loads(pickle.dumps(sep))  # the flag's lock does not travel; a new one is made
    np.testing.assert_array_equal(copied.separate(inputs[0], SR), alone[0])


def test_silent_recordings_give_silent_speakers_and_do_not_sink_a_batch(tiny_model):
    """An all-zero clip (an unused channel, a muted segment) in separate_many raised and lost every result."""
    sep = Separator(tiny_model, device="cpu")
    loud, silent = noise(8000, seed=5), np.zeros(6000, np.float32)
    out = sep.separate_many([loud, silent], SR)
    np.testing.assert_array_equal(out[1], np.zeros((2, 6000), np.float32))
    np.testing.assert_allclose(out[0], sep.separate(loud, SR), atol=1e-6)


def test_a_callable_that_returns_another_speaker_count_is_refused():
    """A NumPy callable whose config says 2 speakers but which returns 1 gave a [1, T] result without a word."""
    class OneSpeaker:
        config = types.SimpleNamespace(sample_rate=SR, num_spks=2, encoder_kernel_size=16)

        def __call__(self, batch):
            return batch[:, None, :]

    with pytest.raises(ValueError, match="num_spks = 2"):
        Separator(OneSpeaker(), chunk_seconds=10.0).separate(noise(4000, seed=6), SR)


def test_from_pretrained_takes_the_model_names_the_cli_takes():
    sep = Separator.from_pretrained("default", device="cpu")
    assert sep.refinements == Separator.from_pretrained(device="cpu").refinements
    assert "Separator(MossFormer2, 16000 Hz, 2 speakers" in repr(sep) and "refinements=[" in repr(sep)


def test_compile_layers_option_compiles_the_network_and_keeps_its_output(tiny_model):
    """compile_layers runs MossFormer2.compile_layers on the Separator's model (in place, as .to does); on the CPU
    it warns that it is meant for CUDA, and the output equals the eager Separator's."""
    wave = noise(40000, 29)
    options = dict(device="cpu", chunk_seconds=1.0, overlap_seconds=0.25)
    expected = Separator(tiny_model, **options).separate(wave, SR)
    model = copy.deepcopy(tiny_model)
    with pytest.warns(UserWarning, match="meant for CUDA"):
        sep = Separator(model, compile_layers=True, **options)
    layers = model.mask_net.mdl.intra_mdl.mossformerM
    assert all(layer._compiled_call_impl is not None for layer in [*layers.layers, *layers.fsmn])
    torch._dynamo.reset()  # compile afresh, so that the count below is this call's
    compiled_frames = torch._dynamo.utils.counters["frames"]["ok"]
    np.testing.assert_allclose(sep.separate(wave, SR), expected, atol=1e-5, rtol=1e-4)
    assert torch._dynamo.utils.counters["frames"]["ok"] > compiled_frames  # compiled, not a silent eager fallback


def test_compile_layers_option_refuses_what_it_cannot_compile(tiny_model):
    """Clear refusals: another kind of model, and reduced precision on the CPU (a compiled bf16 network did not
    finish compiling there)."""
    with pytest.raises(ValueError, match="compiles our MossFormer2 network; this model is a LouderBandFirst"):
        Separator(LouderBandFirst(), compile_layers=True)
    for model, dtype in ((tiny_model, "bfloat16"), (copy.deepcopy(tiny_model).bfloat16(), "float32")):
        with pytest.raises(ValueError, match="float32 only on the CPU"):
            Separator(model, device="cpu", dtype=dtype, compile_layers=True)
    layers = tiny_model.mask_net.mdl.intra_mdl.mossformerM
    assert all(layer._compiled_call_impl is None for layer in layers.layers)  # refused before compiling


def test_chunk_seconds_none_separates_every_input_in_one_pass():
    """Test sets are scored on whole mixtures (the standard protocol, and the trainer's validation): evaluate cut
    mixtures longer than 10 s into chunks and stitched them, which scored differently."""
    model = LinearModel()
    sep = Separator(model, device="cpu", chunk_seconds=None, normalize="none")
    long = noise(25 * SR, 3, scale=0.1)
    out = sep.separate(long, SR)
    assert [tuple(x.shape) for x in model.seen] == [(1, 25 * SR)]  # one pass, no chunks
    np.testing.assert_allclose(out, np.stack([0.25 * long, 0.75 * long]), atol=1e-6)
    assert sep.chunk_seconds is None and "chunk_seconds=None" in repr(sep) and sep.chunk_count(10**8, SR) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no chunk: no overlap advice, nothing for clearvoice to ignore
        Separator(model, device="cpu", chunk_seconds=None, overlap_seconds=0.0)
        Separator(model, device="cpu", chunk_seconds=None, stitching="clearvoice")
    assert Separator(model, device="cpu").chunk_seconds == 10.0


class SameVoiceTwice:
    """A NumPy "model" that puts its whole input into both outputs: every overlap holds "one voice", so the
    stitcher can only guess the speaker order at each chunk boundary."""

    def __init__(self):
        self.config = make_tiny_config()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.stack([batch, batch], axis=1).astype(np.float32)


def test_each_file_of_a_batch_has_its_guessed_boundaries_reported_by_name(tmp_path):
    """As a UserWarning, the second file's notice (same text: same boundaries) was swallowed by Python's
    once-per-place rule, and neither named its file."""
    sep = Separator(SameVoiceTwice(), chunk_seconds=2, overlap_seconds=1, normalize="none")
    paths = []
    for name in ("a.wav", "b.wav"):
        sf.write(str(tmp_path / name), noise(5 * SR, seed=len(paths)), SR)
        paths.append(tmp_path / name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own rule: an identical warning once per place
        for path in paths:
            sep.separate_file(path, tmp_path / "out")
    guesses = [str(w.message) for w in caught if "was a guess" in str(w.message)]
    assert [g.rsplit(" (", 1)[1] for g in guesses] == [f"{p})" for p in paths]
    assert all(g.startswith("the speaker order at") for g in guesses)  # filters on the message still match


def test_one_pass_on_a_fixed_length_export_chunks_by_its_length_and_long_inputs_are_warned_about():
    """chunk_seconds=None (evaluate's default) failed every mixture on a fixed-length export."""
    fixed = Separator(LouderBandFirst(input_shape=[1, 4 * SR]), chunk_seconds=None)
    assert (fixed.chunk_seconds, fixed.overlap_seconds) == (4.0, 2.0)
    assert fixed.separate(noise(9 * SR), SR).shape == (2, 9 * SR)
    one_pass = Separator(LinearModel(record=False), device="cpu", chunk_seconds=None)
    assert one_pass.overlap_seconds is None and "overlap_seconds=None" in repr(one_pass)
    with pytest.warns(UserWarning, match="an input of 61 s is separated in one pass .* memory grows"):
        one_pass.separate(noise(61 * SR, scale=0.01), SR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a silent input costs no pass at all
        one_pass.separate(np.zeros(61 * SR, np.float32), SR)


class Compilable(LinearModel):
    def compile_layers(self):
        return self


def test_warnings_name_the_line_that_called_the_separator(tiny_model):
    """Warnings raised in the Separator's helpers (backends.py, inputs.py, its batching of items) point at the
    caller's line, not at the helper: their stacklevels count the frames in between, which moving code changes."""
    cancelling = noise((2, SR))
    cancelling[1] = -cancelling[0]
    one_pass = Separator(LinearModel(record=False), device="cpu", chunk_seconds=None)
    calls = {"float16": lambda: Separator(tiny_model, device="cpu", dtype="float16"),
             "compile": lambda: Separator(Compilable(), device="cpu", compile_layers=True),
             "cuda graphs": lambda: Separator(tiny_model, device="cpu", cuda_graphs=True),
             "export's device": lambda: Separator(LouderBandFirst(), device="cuda"),
             "downmix": lambda: Separator(tiny_model, device="cpu").separate_many([cancelling], SR),
             "downmix, one input": lambda: Separator(tiny_model, device="cpu").separate(cancelling, SR),
             "one pass": lambda: one_pass.separate(noise(61 * SR, scale=0.01), SR),
             "one pass, several inputs": lambda: one_pass.separate_many([noise(61 * SR, scale=0.01)], SR)}
    for name, call in calls.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        where = [(w.filename, w.lineno) for w in caught]
        assert where == [(__file__, call.__code__.co_firstlineno)], (name, [str(w.message) for w in caught], where)


def _input_alive_during_separation(monkeypatch) -> list[bool]:
    """Whether the last array ``read_audio`` returned is still alive at each forward pass of a Separator."""
    import weakref

    import mossformer2.audio
    import mossformer2.separation.separator as separator_module

    reads, alive = [], []
    read_audio_itself = mossformer2.audio.read_audio

    def read(path):
        wave, rate = read_audio_itself(path)
        reads.append(weakref.ref(wave))
        return wave, rate

    def items(self, waves):
        alive.append(reads[-1]() is not None)
        return separate_items(self, waves)

    separate_items = Separator._separate_items
    monkeypatch.setattr(separator_module, "read_audio", read)
    monkeypatch.setattr(mossformer2.audio, "read_audio", read)  # (the command imports it where it reads)
    monkeypatch.setattr(Separator, "_separate_items", items)
    return alive


def test_a_file_is_freed_once_at_the_model_rate_unless_plotted(tiny_model, tmp_path, monkeypatch):
    """separate_file kept the decoded input alive beside its outputs (1.2 GB more at the peak for an hour of
    44.1 kHz stereo); only the plot needs it."""
    pytest.importorskip("matplotlib")
    alive = _input_alive_during_separation(monkeypatch)
    sf.write(str(tmp_path / "a.wav"), noise((2, 3 * 44100)).T, 44100)
    sep = Separator(tiny_model, device="cpu")
    first = sep.separate_file(tmp_path / "a.wav", tmp_path / "out")
    sep.separate_file(tmp_path / "a.wav", tmp_path / "plotted", plot=True)
    assert alive == [False, True]
    assert [sf.read(str(p))[0].shape for p in first] == [(3 * 44100,)] * 2


def test_release_inputs_empties_the_list_and_separates_the_same(tiny_model, monkeypatch):
    sep = Separator(tiny_model, device="cpu", channels="each")
    waves = [noise((2, 20000), seed=1), noise((2, 12000), seed=2)]
    expected = sep.separate_many(waves, 22050)
    inputs = [w.copy() for w in waves]
    got = sep.separate_many(inputs, 22050, release_inputs=True)
    assert inputs == [None, None]
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
        assert a.shape[:2] == (2, 2)  # [S, C, T]
    import weakref

    tensor = torch.from_numpy(waves[0].copy())
    alive, separate_items = [], Separator._separate_items
    watched = weakref.ref(tensor)
    monkeypatch.setattr(Separator, "_separate_items", lambda self, w: (alive.append(watched() is not None),
                                                                        separate_items(self, w))[1])
    inputs = [tensor]
    del tensor
    tensors = sep.separate_many(inputs, 22050, release_inputs=True)
    assert isinstance(tensors[0], torch.Tensor)  # a tensor's outputs are tensors, released or not
    assert alive == [False]  # (only its device was kept)
    with pytest.raises(TypeError, match="needs the inputs in a list"):
        sep.separate_many(tuple(waves), 22050, release_inputs=True)


def test_the_channel_cancellation_check_makes_no_float64_copy():
    """It squared the whole [C, T] input in float64, twice per file (a 2.4 GB transient per hour of stereo)."""
    from mossformer2.separation.inputs import channels_cancel

    wave = noise((2, 3_000_000), seed=4)
    tracemalloc.start()
    cancel = channels_cancel(wave)
    _, allocated = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert not cancel and allocated < wave.nbytes  # (the mono downmix: half of it)
    assert channels_cancel(np.stack([wave[0], -wave[0]]))


def test_a_recording_below_float32_normal_range_is_silence_without_a_forward_pass():
    """All-denormal input: exact zeros out, and the model never runs (neither scaled up nor fed as is)."""
    model = LinearModel()
    out = Separator(model, device="cpu").separate(np.full(4000, 1e-40, np.float32), SR)
    assert model.seen == []
    assert out.shape == (2, 4000) and np.all(out == 0)


@pytest.mark.filterwarnings("ignore:overlap_seconds=0.25")
def test_inputs_exactly_one_chunk_long_share_one_batched_pass():
    """A recording of exactly chunk_seconds is a single pass: it batches with other short inputs."""
    model = build_model(make_tiny_config()).eval()
    shapes = record_lengths(model)
    sep = Separator(model, device="cpu", chunk_seconds=0.5, overlap_seconds=0.25, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sep.separate_many([noise(SR // 2, 1), noise(SR // 2, 2)], SR)
    assert shapes == [(2, SR // 2)]
    assert [o.shape for o in out] == [(2, SR // 2)] * 2


def _bands(freq_low=300, freq_high=4000):
    t = np.arange(SR) / SR
    return np.sin(2 * np.pi * freq_low * t), np.sin(2 * np.pi * freq_high * t)


@pytest.mark.parametrize("refinement", ["wiener_filter", "mixture_consistency"])
def test_refined_channels_keep_a_quiet_speakers_recorded_polarity(refinement):
    """With refinements that make each channel's outputs sum to its input, their sign is right as it is: a quiet
    speaker heard in opposite phase by the second microphone (4 kHz delayed half a period) is not flipped to the
    first channel's sign, and the second channel's outputs still sum to it."""
    low, high = _bands()
    stereo = np.stack([low + 0.3 * high, low - 0.05 * high]).astype(np.float32)
    out = Separator(LouderBandFirst(), channels="each", normalize="none", **{refinement: True}).separate(stereo, SR)
    np.testing.assert_allclose(out[:, 1].sum(0), stereo[1], atol=1e-3)
    assert np.corrcoef(out[1, 1], -high)[0, 1] > 0.99


def test_speakers_are_matched_to_the_first_channel_that_is_not_silent():
    """Channel 0 silent: channel 2 takes channel 1's speaker order, not an order matched to silence."""
    low, high = _bands(300, 3000)
    three = np.stack([np.zeros(SR), low + 0.3 * high, 0.3 * low + high]).astype(np.float32)
    out = Separator(LouderBandFirst(), channels="each", normalize="none").separate(three, SR)
    assert np.all(out[:, 0] == 0)
    assert np.corrcoef(out[0, 1], low)[0, 1] > 0.99 and np.corrcoef(out[0, 2], low)[0, 1] > 0.99
    assert np.corrcoef(out[1, 2], high)[0, 1] > 0.99


def test_a_reverse_wired_channel_keeps_a_quiet_speakers_polarity_without_refinements():
    """A speaker too quiet in a channel to tell its sign there (under 0.1 correlation) takes the first channel's
    sign times the channels' own: in a channel wired in reverse it stays reversed, as recorded."""
    low, high = _bands(300, 3000)
    stereo = np.stack([low + 0.3 * high, -(low + 0.05 * high)]).astype(np.float32)
    out = Separator(LouderBandFirst(), channels="each", normalize="none").separate(stereo, SR)
    assert np.corrcoef(out[0, 1], -low)[0, 1] > 0.99
    assert np.corrcoef(out[1, 1], -high)[0, 1] > 0.99


def test_an_input_exactly_as_long_as_the_model_needs_is_separated():
    sep = Separator(LinearModel(record=False), device="cpu")
    n = sep.min_samples
    assert sep.separate(noise(n), SR).shape == (2, n)
    with pytest.raises(ValueError, match="too short"):
        sep.separate(noise(n - 1), SR)


def test_cancelling_channels_are_something_to_separate_channel_by_channel():
    x = noise(8000)
    both = np.stack([x, -x])
    assert "cancel" in Separator(LinearModel(record=False), device="cpu").nothing_to_separate(both)
    assert Separator(LinearModel(record=False), device="cpu", channels="each").nothing_to_separate(both) is None


def test_a_2_s_fixed_length_export_overlaps_by_a_safe_1_s_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sep = Separator(LouderBandFirst(input_shape=[1, 2 * SR]))
    assert (sep.chunk_seconds, sep.overlap_seconds) == (2.0, 1.0)


class _OnCuda(LouderBandFirst):
    """An exported-model wrapper whose ONNX Runtime session runs on CUDA (no GPU needed: it is never called)."""

    class session:  # noqa: N801
        @staticmethod
        def get_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_an_export_on_cuda_takes_a_numbered_cuda_device_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sep = Separator(_OnCuda(), device="cuda:0")
    assert sep.device == "cuda"
    with pytest.warns(UserWarning, match="is not where this"):
        Separator(_OnCuda(), device="cpu")


def test_an_exported_model_refuses_reduced_precision():
    for dtype in ("bfloat16", "float16"):
        with pytest.raises(ValueError, match="only available with the torch backend"):
            Separator(LouderBandFirst(), dtype=dtype)
    assert Separator(LouderBandFirst(), dtype="float32").dtype == "float32"


class _TrainFlagSeen(LinearModel):
    def forward(self, x):
        self.flags = getattr(self, "flags", []) + [self.training]
        return super().forward(x)


def test_the_top_level_module_itself_runs_in_eval_mode_and_gets_its_flag_back():
    """A model whose own forward reads self.training (not only its dropout submodules) separates in eval mode."""
    model = _TrainFlagSeen(record=False).train()
    Separator(model, device="cpu").separate(noise(4000), SR)
    assert model.flags == [False] and model.training


def test_the_highest_documented_rates_are_accepted():
    from mossformer2.separation.inputs import check_rate

    assert check_rate("sample_rate", 768000) == 768000 and check_rate("output_rate", 1000) == 1000
    out = Separator(LinearModel(record=False), device="cpu").separate(noise(4000), SR, output_rate=768000)
    assert out.shape == (2, 4000 * 48)


def test_channels_cancel_only_60_db_below_the_loudest_channel():
    from mossformer2.separation.inputs import channels_cancel

    x = noise(16000)
    assert not channels_cancel(np.stack([x, -0.99 * x]))  # the mix 46 dB down: still something to separate
    assert channels_cancel(np.stack([x, -0.9995 * x]))  # 72 dB down


@pytest.mark.filterwarnings("ignore:overlap_seconds=0.25")
def test_chunks_of_a_long_input_are_batched_by_batch_size():
    model = build_model(make_tiny_config()).eval()
    shapes = record_lengths(model)
    sep = Separator(model, device="cpu", chunk_seconds=1.0, overlap_seconds=0.25, batch_size=4)
    sep.separate(noise(int(4.5 * SR)), SR)  # 6 chunks
    assert [s[0] for s in shapes] == [4, 2]


def test_clearvoice_stitching_gives_no_speaker_swap_advice_for_short_overlaps():
    """Its fixed windows ignore the overlap: only the 'not used' notice, not the aligned stitcher's warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Separator(LinearModel(record=False), device="cpu", stitching="clearvoice", chunk_seconds=4,
                  overlap_seconds=0.5)
    messages = [str(w.message) for w in caught]
    assert any("are not used" in m for m in messages)
    assert not any("speakers may swap" in m for m in messages)


def test_a_model_without_its_own_minimum_gets_the_kernels_minimum():
    """An exported-model callable has no min_input_length: the minimum comes from its config's encoder kernel,
    and a shorter input is refused before any pass."""
    from mossformer2.models.config import min_input_length

    model = LouderBandFirst()
    sep = Separator(model)
    assert sep.min_samples == min_input_length(model.config.encoder_kernel_size) > 1
    with pytest.raises(ValueError, match="too short"):
        sep.separate(noise(sep.min_samples - 1), SR)


def test_separate_file_refuses_a_silent_file_and_writes_nothing(tmp_path):
    """As `mossformer2 separate` fails it: no silent speaker files (separate() itself returns silence)."""
    sf.write(str(tmp_path / "silent.wav"), np.zeros(8000, np.float32), SR)
    with pytest.raises(ValueError, match=r"silent\.wav: audio is all silent"):
        Separator(LinearModel(record=False), device="cpu").separate_file(tmp_path / "silent.wav", tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_the_wiener_filter_comes_before_mixture_consistency():
    """The documented order: ensemble, Wiener filter, mixture consistency (the last makes the sum exact)."""
    from mossformer2.separation.refine import mixture_consistency, wiener_filter

    class Unbalanced(LouderBandFirst):  # outputs that do not sum to the input: half the low band, twice the high
        def __call__(self, batch):
            return super().__call__(batch) * np.array([0.5, 2.0], np.float32)[None, :, None]

    model = Unbalanced()
    x = noise(SR, 3, scale=0.3)
    got = Separator(model, normalize="none", wiener_filter=True, mixture_consistency=True).separate(x, SR)
    batch = x[None]
    expected = mixture_consistency(wiener_filter(model(batch), batch), batch)[0]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_chunk_count_of_clearvoice_stitching_is_its_window_count():
    """chunk_count says how many passes a recording needs: under clearvoice stitching, its 2 s windows."""
    model = LinearModel()
    sep = Separator(model, device="cpu", stitching="clearvoice", normalize="none")
    n = 5 * SR
    sep.separate(noise(n), SR)
    assert sep.chunk_count(n, SR) == len(model.seen) > 1

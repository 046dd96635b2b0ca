"""Dynamic mixing: speaker-aware sampling, gains, speed, noise, determinism across workers, bad files."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from mossformer2.data.collate import collate_fn
from mossformer2.data.datasets import AudioStore, BadAudioError
from mossformer2.data.dynamic_mixing import DynamicMixingDataset, load_noise_files, load_utterances
from mossformer2.losses import si_sdr

SR = 8000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """4 speakers x 3 utterances; every sample of speaker k is a tone of frequency 200*(k+1) Hz."""
    root = tmp_path_factory.mktemp("corpus")
    for k in range(4):
        for n in range(3):
            t = np.arange(int(SR * (0.6 + 0.2 * n))) / SR
            wave = 0.3 * np.sin(2 * np.pi * 200 * (k + 1) * t + n)
            (root / f"spk{k}").mkdir(exist_ok=True)
            sf.write(root / f"spk{k}" / f"{n}.wav", wave.astype(np.float32), SR, subtype="FLOAT")
    noise = root.parent / f"{root.name}_noise"
    noise.mkdir()
    sf.write(noise / "n.wav", np.random.default_rng(0).standard_normal(3000).astype(np.float32) * 0.1, SR)
    return root, noise


def _dominant_hz(wave: torch.Tensor) -> float:
    spectrum = np.abs(np.fft.rfft(wave.numpy()))
    return float(np.argmax(spectrum) * SR / len(wave))


def test_load_utterances_folder_and_list(corpus, tmp_path):
    root, _ = corpus
    utts = load_utterances(root)
    assert len(utts) == 12 and {u.speaker for u in utts} == {"spk0", "spk1", "spk2", "spk3"}
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n{root}/spk0/0.wav alice\n{root}/spk1/0.wav bob\n")
    assert [(u.speaker, u.path.name) for u in load_utterances(listing)] == [("alice", "0.wav"), ("bob", "0.wav")]
    listing.write_text(f"{root}/spk0/0.wav\n")
    with pytest.raises(ValueError, match="path speaker"):
        load_utterances(listing)
    listing.write_text(f"{root}/nope.wav x\n")
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_utterances(listing)
    with pytest.raises(FileNotFoundError):
        load_utterances(tmp_path / "missing")


def test_mixture_has_distinct_speakers_and_sums(corpus):
    root, _ = corpus
    ds = DynamicMixingDataset(load_utterances(root), 3, AudioStore(SR, cache=True), 40, segment_samples=2000,
                              seed=1)
    for i in range(len(ds)):
        ex = ds[i]
        assert ex["sources"].shape == (3, 2000)
        torch.testing.assert_close(ex["sources"].sum(0), ex["mix"], atol=1e-5, rtol=0)
        freqs = {round(_dominant_hz(s) / 200) for s in ex["sources"]}
        assert len(freqs) == 3  # three different speakers in every mixture
        assert float(ex["mix"].abs().max()) < 1.0


def test_gains_follow_configured_range(corpus):
    root, _ = corpus
    ds = DynamicMixingDataset(load_utterances(root), 2, AudioStore(SR), 30, segment_samples=3000, seed=2,
                              gain_db=(-5.0, 5.0))
    ratios = []
    for i in range(len(ds)):
        s = ds[i]["sources"]
        rms = s.pow(2).mean(-1).sqrt()
        ratios.append(float(20 * torch.log10(rms[0] / rms[1])))
    assert max(np.abs(ratios)) <= 10.0 + 1e-3
    assert np.std(ratios) > 2.0  # random, not constant


def test_speed_perturbation_changes_pitch(corpus):
    root, _ = corpus
    utts = [u for u in load_utterances(root) if u.speaker in ("spk0", "spk2")]
    ds = DynamicMixingDataset(utts, 2, AudioStore(SR), 20, segment_samples=2000, seed=3,
                              speed_perturb=(1.2, 1.25))
    freqs = sorted(_dominant_hz(s) for s in ds[0]["sources"])
    assert 235 <= freqs[0] <= 255 and 705 <= freqs[1] <= 760  # 200 and 600 Hz played 1.2-1.25x faster


def test_random_polarity_negates_sources_independently_and_keeps_everything_else(corpus):
    root, _ = corpus
    utts = load_utterances(root)
    kwargs = dict(num_spks=2, store=AudioStore(SR, cache=True), num_examples=40, segment_samples=2000, seed=5)
    plain = DynamicMixingDataset(utts, **kwargs)
    flipped = DynamicMixingDataset(utts, random_polarity=True, **kwargs)
    signs = []
    for i in range(len(plain)):
        a, b = plain[i], flipped[i]
        assert a["id"] == b["id"]  # same speakers, files, crops and gains: only the signs were added
        sign = torch.sign((a["sources"] * b["sources"]).sum(-1) / a["sources"].pow(2).sum(-1))
        signs.append(sign.tolist())
        # The overall level is drawn on the mixture, which the signs change: compare up to that scale.
        scale = b["sources"].norm() / a["sources"].norm()
        torch.testing.assert_close(b["sources"], a["sources"] * sign[:, None] * scale, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b["sources"].sum(0), b["mix"], atol=1e-5, rtol=0)
    signs = np.array(signs)
    assert set(np.unique(signs)) == {-1.0, 1.0}
    assert (signs[:, 0] != signs[:, 1]).any() and (signs[:, 0] == signs[:, 1]).any()  # per source, not per mixture


@pytest.mark.parametrize("level", [-35.0, -15.0])
def test_mixture_level_follows_level_db(corpus, level):
    """A one-value level_db range fixes the mixture's RMS level (the tones peak far below clipping here)."""
    root, _ = corpus
    ds = DynamicMixingDataset(load_utterances(root), 2, AudioStore(SR, cache=True), 10, segment_samples=2000, seed=6,
                              level_db=(level, level))
    for i in range(len(ds)):
        ex = ds[i]
        assert float(20 * torch.log10(ex["mix"].pow(2).mean().sqrt())) == pytest.approx(level, abs=0.01)
        assert float(ex["mix"].abs().max()) < 0.9  # the no-clipping cap did not apply
        torch.testing.assert_close(ex["sources"].sum(0), ex["mix"], atol=1e-5, rtol=0)  # sources scaled alike


def test_noise_at_requested_snr(corpus):
    root, noise = corpus
    ds = DynamicMixingDataset(load_utterances(root), 2, AudioStore(SR), 5, segment_samples=2000, seed=4,
                              noise_files=load_noise_files(noise), noise_snr_db=(10.0, 10.0))
    ex = ds[0]
    speech = ex["sources"].sum(0)
    residual = ex["mix"] - speech
    snr = float(10 * torch.log10(speech.pow(2).sum() / residual.pow(2).sum()))
    assert snr == pytest.approx(10.0, abs=0.05)


def test_deterministic_across_workers_and_epochs(corpus):
    root, _ = corpus
    ds = DynamicMixingDataset(load_utterances(root), 2, AudioStore(SR), 12, segment_samples=1000, seed=5,
                              speed_perturb=(0.9, 1.1))

    def epoch_data(workers: int, epoch: int) -> list[torch.Tensor]:
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_fn)
        return [b["mix"] for b in loader]

    a, b = epoch_data(0, 0), epoch_data(2, 0)
    assert len(a) == len(b) == 3  # 12 examples in batches of 4, from both loaders
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = epoch_data(0, 1)
    assert not torch.equal(a[0], c[0])  # a new epoch makes new mixtures
    valid = DynamicMixingDataset(load_utterances(root), 2, AudioStore(SR), 6, seed=5, fixed=True,
                                 max_samples=5000)
    first = valid[3]["mix"]
    valid.set_epoch(7)
    assert torch.equal(first, valid[3]["mix"])  # validation mixtures do not change
    lengths = [valid[i]["mix"].shape[-1] for i in range(6)]
    assert min(lengths) >= int(0.6 * SR) and max(lengths) <= 5000  # shortest utterance, capped


def test_mixture_sources_are_the_references(corpus):
    """The sources are the mixture's own components, aligned sample for sample: the mixture minus one source is
    the other (a shift of the sources against the mixture, or a gain applied to one side only, breaks this), and
    the mixture alone is a poor estimate of either."""
    root, _ = corpus
    ds = DynamicMixingDataset(load_utterances(root), 2, AudioStore(SR), 4, segment_samples=2000, seed=6)
    ex = ds[0]
    rest = (ex["mix"] - ex["sources"][0])[None, None]
    assert float(si_sdr(rest, ex["sources"][1][None, None])) > 60
    assert (si_sdr(ex["mix"].expand(2, -1)[None], ex["sources"][None]) < 10).all()


def test_bad_files_error_or_skip(corpus, tmp_path):
    root, _ = corpus
    utts = load_utterances(root)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    from mossformer2.data.dynamic_mixing import Utterance

    with_bad = utts + [Utterance(bad, "spk0")] * 3
    strict = DynamicMixingDataset(with_bad, 2, AudioStore(SR), 50, segment_samples=500, seed=0)
    with pytest.raises(BadAudioError, match="bad.wav"):
        for i in range(50):
            strict[i]
    lenient = DynamicMixingDataset(with_bad, 2, AudioStore(SR), 50, segment_samples=500, seed=0,
                                   skip_bad_files=True)
    assert sum(lenient[i]["skipped"] for i in range(50)) > 0
    cached = DynamicMixingDataset(with_bad, 2, AudioStore(SR, cache=True), 10, segment_samples=500,
                                  skip_bad_files=True)
    assert cached.preload_skipped == 1 and all(cached[i]["skipped"] == 0 for i in range(10))


def test_crops_stay_on_audio_and_silent_utterances_are_bad_files(corpus, tmp_path):
    """A crop inside an utterance's long leading or trailing digital silence, or a silent utterance, left a source
    without audio: a constant SI-SDR in the loss and no gradient for it."""
    root, _ = corpus
    from mossformer2.data.dynamic_mixing import Utterance

    padded = tmp_path / "padded.wav"  # 0.1 s of tone between 1 s of zeros on each side
    tone = 0.3 * np.sin(2 * np.pi * 300 * np.arange(800) / SR)
    sf.write(padded, np.r_[np.zeros(SR), tone, np.zeros(SR)].astype(np.float32), SR, subtype="FLOAT")
    pair = [Utterance(padded, "a"), Utterance(root / "spk1" / "0.wav", "b")]
    for segment in (400, 4000):  # shorter than the audio (inside it) and longer than it (holds it all)
        ds = DynamicMixingDataset(pair, 2, AudioStore(SR), 30, segment_samples=segment, seed=1)
        for i in range(30):
            active = (ds[i]["sources"] != 0).float().mean(-1)  # inside the tone, or holding all of it
            assert (active >= min(800, segment) / segment - 0.01).all(), (segment, i, active)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(2000, np.float32), SR)
    with_silent = [Utterance(silent, "a"), Utterance(root / "spk1" / "0.wav", "b")]
    with pytest.raises(BadAudioError, match="silent.wav is silent"):
        DynamicMixingDataset(with_silent, 2, AudioStore(SR), 1, segment_samples=400)[0]
    lenient = DynamicMixingDataset(with_silent + [Utterance(root / "spk0" / "0.wav", "a")], 2, AudioStore(SR), 20,
                                   segment_samples=400, skip_bad_files=True)
    assert sum(lenient[i]["skipped"] for i in range(20)) > 0
    # With the cache (data.cache_audio) they are found up front, not when first drawn, hours into a run.
    with pytest.raises(BadAudioError, match=r"1 silent utterance\(s\), e.g. .*silent.wav"):
        DynamicMixingDataset(with_silent, 2, AudioStore(SR, cache=True), 1, segment_samples=400)
    cached = DynamicMixingDataset(with_silent + [Utterance(root / "spk0" / "0.wav", "a")], 2,
                                  AudioStore(SR, cache=True), 20, segment_samples=400, skip_bad_files=True)
    assert cached.preload_skipped == 1 and all(cached[i]["skipped"] == 0 for i in range(20))


def test_too_few_speakers(corpus):
    root, _ = corpus
    utts = [u for u in load_utterances(root) if u.speaker == "spk0"]
    with pytest.raises(ValueError, match=r"\(model.num_spks\) needs utterances of at least 2 different speakers"):
        DynamicMixingDataset(utts, 2, AudioStore(SR), 4, segment_samples=100)


def test_too_few_speakers_names_the_config_key(corpus):
    from mossformer2.data.loaders import build_datasets
    from mossformer2.training.config import train_config_from_dict

    root, _ = corpus
    one = root.parent / "one_speaker.txt"  # a `path speaker` list of a single speaker
    one.write_text("".join(f"{f} spk0\n" for f in sorted((root / "spk0").iterdir())))
    cfg = train_config_from_dict({"model": {"sample_rate": SR}, "data": {
        "sample_rate": SR, "segment_seconds": 0.1, "num_workers": 0,
        "dynamic_mixing": {"train_utterances": str(one), "valid_utterances": str(root)}}})
    with pytest.raises(ValueError, match=r"^data\.dynamic_mixing\.train_utterances: dynamic mixing of 2 speakers"):
        build_datasets(cfg, progress=False)


def test_validation_speakers_that_are_also_training_speakers_draw_a_warning(corpus, caplog):
    from mossformer2.data.loaders import build_datasets
    from mossformer2.training.config import train_config_from_dict

    root, _ = corpus

    def build(valid: str) -> list[str]:
        cfg = train_config_from_dict({"model": {"sample_rate": SR}, "data": {
            "sample_rate": SR, "segment_seconds": 0.1, "num_workers": 0,
            "dynamic_mixing": {"train_utterances": str(root), "valid_utterances": valid}}})
        caplog.clear()
        with caplog.at_level("WARNING", logger="mossformer2.data.loaders"):
            build_datasets(cfg, progress=False)
        return [r.getMessage() for r in caplog.records]

    speakers = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = sorted(root.rglob("*.wav"))
    (message,) = build(str(root))
    assert f"share speaker name(s) {', '.join(speakers[:5])}" in message and "not on held-out speakers" in message
    assert f"and {len(files)} recording(s)" in message
    renamed = root.parent / "renamed.txt"  # the same recordings under other speaker names
    renamed.write_text("".join(f"{f} other{k}\n" for k, f in enumerate(files)))
    (message,) = build(str(renamed))
    assert f"share {len(files)} recording(s): validation" in message
    held_out = root.parent / "held_out"  # copies under other names: nothing shared
    for k, f in enumerate(files[:4]):
        (held_out / f"other{k % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, held_out / f"other{k % 2}" / f.name)
    assert build(str(held_out)) == []


def test_a_synthetic_corpus_is_made_again_when_its_settings_change(tmp_path):
    from mossformer2.data.loaders import prepare_synthetic_data
    from mossformer2.training.config import train_config_from_dict

    def prepare(speakers: int) -> list[str]:
        cfg = train_config_from_dict({"data": {"synthetic": True, "synthetic_speakers": speakers,
                                               "synthetic_utterances": 1, "synthetic_seconds": 0.1}})
        prepare_synthetic_data(cfg, tmp_path)
        return sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("*/spk*"))

    six = prepare(6)
    assert len(six) == 6
    wav = next(tmp_path.glob("train/spk*/*.wav"))
    made = wav.stat().st_mtime_ns
    assert prepare(6) == six and wav.stat().st_mtime_ns == made  # same settings: the corpus is reused
    assert len(prepare(10)) == 10  # not the 6 speakers still on disk


def test_indexing_stops_at_the_length_and_counts_negative_indices_from_the_end(corpus):
    """No IndexError made ``for ex in dataset`` endless and ``dataset[100]`` of a 3-example dataset an example."""
    root, _ = corpus
    ds = DynamicMixingDataset(load_utterances(root), 2, AudioStore(SR), num_examples=3, segment_samples=2000)
    # Plain iteration ends after 3 (islice: without the bound it would never end).
    assert [ex["id"] for ex in itertools.islice(ds, 10)] == [ds[i]["id"] for i in range(3)]
    assert ds[-1]["id"] == ds[2]["id"] and ds[-3]["id"] == ds[0]["id"]
    for index in (3, 100, -4):
        with pytest.raises(IndexError, match=f"example {index} out of range: the dataset has 3"):
            ds[index]


def _datasets_from_config(root, noise, **dynamic_mixing):
    from mossformer2.data.loaders import build_datasets
    from mossformer2.training.config import train_config_from_dict

    cfg = train_config_from_dict({
        "model": {"encoder_embedding_dim": 16, "mossformer_sequence_dim": 16, "num_mossformer_layer": 1,
                  "sample_rate": SR},
        "data": {"sample_rate": SR, "segment_seconds": 0.5, "num_workers": 0, "cache_audio": False,
                 "dynamic_mixing": {"train_utterances": str(root), "valid_utterances": str(root),
                                    "examples_per_epoch": 12, "valid_examples": 6, "noise": str(noise),
                                    **dynamic_mixing}}})
    return build_datasets(cfg, progress=False, is_main=False)


def test_the_augmentation_settings_of_a_config_reach_both_datasets(corpus):
    """Each data.dynamic_mixing key changes the mixtures it names (a key dropped between the config and the
    dataset would train without its augmentation, silently): noise and levels in training and validation
    alike, speed and polarity in training only (validation mixtures are the held-out speakers as recorded)."""
    root, noise = corpus
    train, valid = _datasets_from_config(root, noise, noise_prob=1.0, noise_snr_db=[0.0, 0.0],
                                         level_db=[-26.0, -26.0], random_polarity=True, gain_db=[-1, 1],
                                         speed_perturb=[0.9, 1.1])
    assert train.random_polarity and train.speed_perturb == (0.9, 1.1)
    assert not valid.random_polarity and valid.speed_perturb is None
    for dataset in (train, valid):
        assert dataset.gain_db == (-1, 1)
        for index in range(len(dataset)):
            item = dataset[index]
            residual = item["mix"] - item["sources"].sum(0)  # the noise, at 0 dB below the speech
            speech_rms = float(item["sources"].sum(0).pow(2).mean().sqrt())
            assert float(residual.pow(2).mean().sqrt()) == pytest.approx(speech_rms, rel=0.05)
            level_db = 20 * float(torch.log10(item["mix"].pow(2).mean().sqrt()))
            assert level_db == pytest.approx(-26.0, abs=0.05)
    for dataset in _datasets_from_config(root, noise, noise_prob=0.0):
        assert all(torch.allclose(dataset[i]["mix"], dataset[i]["sources"].sum(0), atol=1e-6)
                   for i in range(len(dataset)))
    train, _ = _datasets_from_config(root, noise, noise_prob=0.5)
    noisy = [not torch.allclose(train[i]["mix"], train[i]["sources"].sum(0), atol=1e-6) for i in range(len(train))]
    assert any(noisy) and not all(noisy)


def test_lists_expand_the_home_folder(corpus, tmp_path, monkeypatch):
    """`~/x.wav` in an utterance or noise list is the home folder's file, as in the mixture lists."""
    root, noise = corpus
    monkeypatch.setenv("HOME", str(root.parent))
    utterances, noises = tmp_path / "utterances.txt", tmp_path / "noise.txt"
    utterances.write_text(f"~/{root.name}/spk0/0.wav alice\n~/{root.name}/spk1/0.wav bob\n")
    noises.write_text(f"~/{noise.name}/n.wav\n")
    assert [u.path for u in load_utterances(utterances)] == [root / "spk0" / "0.wav", root / "spk1" / "0.wav"]
    assert load_noise_files(noises) == [noise / "n.wav"]


def test_a_file_named_like_a_home_folder_is_a_file(corpus, tmp_path):
    """`~1.wav` names no user: Path.expanduser raised 'Could not determine home directory' for it."""
    root, noise = corpus
    (tmp_path / "~1.wav").write_bytes((root / "spk0" / "0.wav").read_bytes())
    (tmp_path / "list.txt").write_text(f"~1.wav alice\n{root}/spk1/0.wav bob\n")
    assert load_utterances(tmp_path / "list.txt")[0].path == tmp_path / "~1.wav"


def _tone_corpus(root, levels=(0.3, 0.3, 0.3, 0.3), seconds=(0.6, 0.8, 1.0)):
    for k in range(4):
        (root / f"spk{k}").mkdir()
        for n, s in enumerate(seconds):
            t = np.arange(int(SR * s)) / SR
            sf.write(root / f"spk{k}" / f"{n}.wav", (levels[k] * np.sin(2 * np.pi * 200 * (k + 1) * t + n + 0.3))
                     .astype(np.float32), SR, subtype="FLOAT")
    return load_utterances(root)


def test_gains_are_relative_to_each_utterances_own_level(tmp_path):  # D04
    utts = _tone_corpus(tmp_path, levels=(0.5, 0.05, 0.5, 0.005))  # recordings 20-40 dB apart
    ds = DynamicMixingDataset(utts, 2, AudioStore(SR), 20, segment_samples=3000, seed=2, gain_db=(-2.5, 2.5))
    for i in range(len(ds)):
        rms = ds[i]["sources"].pow(2).mean(-1).sqrt()
        assert abs(float(20 * np.log10(rms[0] / rms[1]))) <= 5.0 + 1e-3


def test_a_short_utterance_lands_at_varying_offsets(tmp_path):  # D03
    utts = _tone_corpus(tmp_path)
    ds = DynamicMixingDataset(utts, 2, AudioStore(SR), 20, segment_samples=12000, seed=3)  # longer than any
    starts = {int(np.flatnonzero(s.numpy())[0]) for i in range(len(ds)) for s in ds[i]["sources"]}
    assert len(starts) > 5


def test_validation_mixtures_take_the_shortest_utterance(tmp_path):  # D10
    utts = _tone_corpus(tmp_path)
    ds = DynamicMixingDataset(utts, 2, AudioStore(SR), 10, seed=4, fixed=True)
    for i in range(len(ds)):
        src = ds[i]["sources"].numpy()
        assert (src[:, :100] != 0).any(1).all() and (src[:, -100:] != 0).any(1).all()  # no zero padding in "min" mode


def test_a_loud_level_never_clips(tmp_path):  # D09
    utts = _tone_corpus(tmp_path)
    ds = DynamicMixingDataset(utts, 2, AudioStore(SR), 10, segment_samples=2000, seed=6, level_db=(0.0, 0.0))
    for i in range(len(ds)):
        assert float(ds[i]["mix"].abs().max()) < 1.0

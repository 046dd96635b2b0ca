"""Pre-mixed datasets: crops share one offset, padding, full-utterance validation, bad files, collate, loaders."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from mossformer2.data.collate import collate_fn
from mossformer2.data.datasets import AudioStore, BadAudioError, MixtureDataset
from mossformer2.data.loaders import ResumableSampler, ShardSampler
from mossformer2.data.manifests import load_manifest

SR = 8000


def _make_wsj_folder(root, lengths, num_spks=2, seed=0):
    """wsj0-2mix layout where mix = sum of sources exactly (float wav)."""
    rng = np.random.default_rng(seed)
    for n, length in enumerate(lengths):
        sources = rng.uniform(-0.3, 0.3, size=(num_spks, length)).astype(np.float32)
        for k in range(num_spks):
            (root / f"s{k + 1}").mkdir(parents=True, exist_ok=True)
            sf.write(root / f"s{k + 1}" / f"u{n}.wav", sources[k], SR, subtype="FLOAT")
        (root / "mix").mkdir(parents=True, exist_ok=True)
        sf.write(root / "mix" / f"u{n}.wav", sources.sum(0), SR, subtype="FLOAT")
    return root


@pytest.mark.parametrize("num_spks", [2, 3])
def test_random_crop_same_offset_for_mix_and_sources(tmp_path, num_spks):
    root = _make_wsj_folder(tmp_path / "d", [3000, 5000, 800], num_spks)
    ds = MixtureDataset(load_manifest(root, num_spks), AudioStore(SR), segment_samples=1000, seed=3)
    for i in range(len(ds)):
        ex = ds[i]
        length = 800 if ds.entries[i].id == "u2" else 1000  # a shorter utterance whole, not padded with zeros
        assert ex["mix"].shape == (length,) and ex["sources"].shape == (num_spks, length)
        torch.testing.assert_close(ex["sources"].sum(0), ex["mix"], atol=1e-6, rtol=0)  # same offset
    # The batch pads it and keeps its true length, which the model and the loss take: padding that counted in
    # the SI-SDR loss (and in the network's normalisations) trained on silence.
    batch = collate_fn([ds[i] for i in range(len(ds))])
    assert batch["mix"].shape == (3, 1000)
    assert sorted(batch["lengths"].tolist()) == [800, 1000, 1000]
    # Deterministic per (seed, epoch, index); a new epoch gives new offsets.
    torch.testing.assert_close(ds[1]["mix"], ds[1]["mix"])
    first = ds[1]["mix"].clone()
    ds.set_epoch(1)
    assert not torch.equal(first, ds[1]["mix"])


def test_crops_of_a_max_set_keep_every_speaker(tmp_path):
    """In a "max" set (wsj0-2mix max/, LibriMix max/) the shorter source is zero-padded to the mixture: a crop in
    its padding has no target (a constant SI-SDR in the loss, no gradient): crops keep to the span all share."""
    rng = np.random.default_rng(0)
    root = tmp_path / "max"
    for k in range(2):
        (root / f"s{k + 1}").mkdir(parents=True)
    (root / "mix").mkdir()
    lengths = {"long_short": (8000, 2400), "short_long": (1500, 8000)}
    for name, (n1, n2) in lengths.items():
        sources = np.zeros((2, 8000), np.float32)
        sources[0, :n1] = rng.uniform(-0.3, 0.3, n1)
        sources[1, :n2] = rng.uniform(-0.3, 0.3, n2)
        for k in range(2):
            sf.write(root / f"s{k + 1}" / f"{name}.wav", sources[k], SR, subtype="FLOAT")
        sf.write(root / "mix" / f"{name}.wav", sources.sum(0), SR, subtype="FLOAT")
    ds = MixtureDataset(load_manifest(root), AudioStore(SR), segment_samples=2000, seed=0)
    for epoch in range(25):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            sources = ds[i]["sources"].numpy()
            active = (sources != 0).mean(-1)
            short = min(lengths[ds.entries[i].id])
            # inside the shared 2400 samples, or (1500 < 2000) holding all of them
            assert active.min() >= min(short, 2000) / 2000 - 1e-9, (epoch, ds.entries[i].id, active)
    # Where the sources share the whole file the draws are those of before (the same offsets as a plain crop).
    from mossformer2.data.datasets import active_span, example_rng, random_crop

    waves = rng.uniform(-1, 1, (3, 5000))
    assert active_span(waves) == (0, 5000)
    for index in range(5):
        plain = random_crop(waves, 700, example_rng(1, 2, index))
        offset = int(example_rng(1, 2, index).integers(0, 5000 - 700 + 1))
        np.testing.assert_array_equal(plain, waves[:, offset:offset + 700])
        np.testing.assert_array_equal(random_crop(waves, 700, example_rng(1, 2, index), active_span(waves)), plain)


def test_validation_uses_full_utterances(tmp_path):
    root = _make_wsj_folder(tmp_path / "d", [3000, 5000])
    ds = MixtureDataset(load_manifest(root), AudioStore(SR))
    lengths = sorted(ds[i]["mix"].shape[-1] for i in range(len(ds)))
    assert lengths == [3000, 5000]
    capped = MixtureDataset(load_manifest(root), AudioStore(SR), max_samples=4000)
    assert max(capped[i]["mix"].shape[-1] for i in range(2)) == 4000


def test_scp_list_and_resampling(tmp_path):
    root = _make_wsj_folder(tmp_path / "d", [1600])
    scp = tmp_path / "list.scp"
    scp.write_text(f"{root}/mix/u0.wav {root}/s1/u0.wav {root}/s2/u0.wav\n")
    ds = MixtureDataset(load_manifest(scp), AudioStore(16000))
    assert ds[0]["mix"].shape == (3200,)  # 8 kHz files read at 16 kHz


def test_corrupt_file_error_names_it_or_is_skipped(tmp_path):
    root = _make_wsj_folder(tmp_path / "d", [1000, 1000, 1000])
    (root / "s2" / "u1.wav").write_bytes(b"RIFF garbage, not audio")
    entries = load_manifest(root)
    ds = MixtureDataset(entries, AudioStore(SR))
    bad = [e.id for e in entries].index("u1")
    with pytest.raises(BadAudioError, match="u1.wav"):
        ds[bad]
    skipping = MixtureDataset(entries, AudioStore(SR), skip_bad_files=True)
    batch = collate_fn([skipping[i] for i in range(3)])
    assert batch["skipped"] == 1 and batch["mix"].shape[0] == 2
    cached = MixtureDataset(entries, AudioStore(SR, cache=True), skip_bad_files=True)
    assert len(cached) == 2  # dropped at preload
    with pytest.raises(BadAudioError, match="u1.wav"):
        MixtureDataset(entries, AudioStore(SR, cache=True))


def _spoil(root):
    """u0's s1 truncated to 900 samples; u1's s2 with twice the rate in its header (so half as long)."""
    s1, _ = sf.read(root / "s1" / "u0.wav", dtype="float32")
    sf.write(root / "s1" / "u0.wav", s1[:900], SR, subtype="FLOAT")
    s2, _ = sf.read(root / "s2" / "u1.wav", dtype="float32")
    sf.write(root / "s2" / "u1.wav", s2, 2 * SR, subtype="FLOAT")


def test_a_source_of_another_length_or_rate_fails_when_the_dataset_is_made(tmp_path, caplog):
    """The headers are checked up front: such a file failed only when the sampler reached it (a validation file
    after a whole epoch, with nothing saved)."""
    root = _make_wsj_folder(tmp_path / "d", [1000, 1000, 1000])
    _spoil(root)
    entries = load_manifest(root)
    with pytest.raises(ValueError, match=r"^2 of 3 mixtures cannot be used: mixture u0: lengths differ at 8000 Hz "
                                         r"\(mix/u0.wav 1000, s1/u0.wav 900, s2/u0.wav 1000 samples\).*mixture u1: "
                                         r".*s2/u1.wav 500 samples.*data\.skip_bad_files=true"):
        MixtureDataset(entries, AudioStore(SR))
    with caplog.at_level("WARNING", logger="mossformer2.data.datasets"):
        skipping = MixtureDataset(entries, AudioStore(SR), skip_bad_files=True)
    assert [e.id for e in skipping.entries] == ["u2"] and "skipping 2 of 3 mixtures" in caplog.text
    assert skipping.file_rates == {SR: 8, 2 * SR: 1}


def test_a_file_spoilt_after_the_check_is_a_bad_example_not_zero_padded(tmp_path):
    root = _make_wsj_folder(tmp_path / "d", [1000, 1000, 1000])
    entries = load_manifest(root)
    ds = MixtureDataset(entries, AudioStore(SR), segment_samples=500)
    skipping = MixtureDataset(entries, AudioStore(SR), skip_bad_files=True)
    _spoil(root)  # while the run goes on
    with pytest.raises(BadAudioError, match=r"lengths differ .* source 1 .*u0.wav 900"):
        ds[[e.id for e in entries].index("u0")]
    with pytest.raises(BadAudioError, match=r"source 2 .*u1.wav 500"):
        ds[[e.id for e in entries].index("u1")]
    batch = collate_fn([skipping[i] for i in range(3)])
    assert batch["skipped"] == 2 and batch["ids"] == ["u2"]


def test_a_silent_reference_is_a_bad_example(tmp_path):
    """Validation scored an all-zero source by the eps of SI-SDR (-17.3 dB against -13.0 dB without it), while
    evaluate refused the same mixture."""
    root = _make_wsj_folder(tmp_path / "d", [1000, 1000])
    sf.write(root / "s2" / "u1.wav", np.zeros(1000, np.float32), SR, subtype="FLOAT")
    entries = load_manifest(root)
    with pytest.raises(BadAudioError, match=r"mixture u1: source 2 .*u1.wav is silent .*data.skip_bad_files=true"):
        MixtureDataset(entries, AudioStore(SR))[1]
    sf.write(root / "s2" / "u1.wav", np.full(1000, 0.1, np.float32), SR, subtype="FLOAT")  # a DC level only
    with pytest.raises(BadAudioError, match=r"source 2 .*u1.wav is silent \(every sample is 0.1\)"):
        MixtureDataset(load_manifest(root), AudioStore(SR))[1]
    skipping = MixtureDataset(entries, AudioStore(SR), skip_bad_files=True)
    batch = collate_fn([skipping[i] for i in range(2)])
    assert batch["skipped"] == 1 and batch["ids"] == ["u0"]


def test_a_multichannel_reference_is_refused_not_averaged(tmp_path):
    """Two channels in a source file (both speakers, say) were averaged into the target; evaluate refused them."""
    root = _make_wsj_folder(tmp_path / "d", [1000, 1000])
    s1, _ = sf.read(root / "s1" / "u1.wav", dtype="float32")
    s2, _ = sf.read(root / "s2" / "u1.wav", dtype="float32")
    sf.write(root / "s1" / "u1.wav", np.stack([s1, s2], axis=1), SR, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"mixture u1: source 1 .*u1.wav has 2 channels: a reference must be one "
                                         r"speaker in one channel \(mono\)"):
        MixtureDataset(load_manifest(root), AudioStore(SR))


def test_a_set_at_another_rate_than_the_config_is_named_once(tmp_path, caplog):
    """8 kHz wsj0-2mix in a 16 kHz config trained on resampled, band-limited audio without a word."""
    from mossformer2.data.loaders import build_datasets
    from mossformer2.training.config import train_config_from_dict

    root = _make_wsj_folder(tmp_path / "d", [1000, 1000])
    cfg = train_config_from_dict({"model": {"sample_rate": 2 * SR}, "data": {
        "sample_rate": 2 * SR, "segment_seconds": 0.05, "num_workers": 0, "train": str(root), "valid": str(root)}})
    for is_main in (True, False):
        caplog.clear()
        with caplog.at_level("WARNING", logger="mossformer2.data.loaders"):
            build_datasets(cfg, progress=False, is_main=is_main)
        messages = [r.getMessage() for r in caplog.records]
        if is_main:
            assert [m.split(":")[0] for m in messages] == ["data.train", "data.valid"]
            assert "6 of 6 files are not at data.sample_rate 16000 Hz (6 at 8000 Hz)" in messages[0]
        else:
            assert messages == []  # said once, by rank 0


def test_missing_file_named(tmp_path):
    root = _make_wsj_folder(tmp_path / "d", [1000])
    scp = tmp_path / "list.scp"
    scp.write_text(f"{root}/mix/u0.wav {root}/s1/u0.wav {root}/s2/missing.wav\n")
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_manifest(scp)
    ds = MixtureDataset(load_manifest(scp, check_files=False), AudioStore(SR))
    with pytest.raises(BadAudioError, match="missing.wav"):
        ds[0]


def test_collate_pads_and_returns_lengths():
    examples = [{"id": "a", "mix": torch.ones(5), "sources": torch.ones(2, 5), "skipped": 0},
                {"id": "b", "mix": torch.ones(3), "sources": torch.ones(2, 3), "skipped": 1}, None]
    batch = collate_fn(examples)
    assert batch["mix"].shape == (2, 5) and batch["sources"].shape == (2, 2, 5)
    assert batch["lengths"].tolist() == [5, 3] and batch["ids"] == ["a", "b"] and batch["skipped"] == 2
    assert torch.all(batch["mix"][1, 3:] == 0) and torch.all(batch["sources"][1, :, 3:] == 0)
    empty = collate_fn([None])
    assert empty["mix"].shape[0] == 0 and empty["skipped"] == 1


def test_resumable_sampler_skips_consumed_examples_and_shards():
    data = list(range(20))
    full = ResumableSampler(data, seed=5)
    full.set_epoch(2)
    order = list(full)
    resumed = ResumableSampler(data, seed=5)
    resumed.set_epoch(2, start=7)
    assert list(resumed) == order[7:] and len(resumed) == 13
    ranks = [ResumableSampler(data, num_replicas=2, rank=r, seed=5) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(2)
    seen = list(ranks[0]) + list(ranks[1])
    assert sorted(seen) == data  # each example once per epoch across ranks
    shards = [list(ShardSampler(list(range(7)), 2, r)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(7))  # validation: no padding duplicates


def test_cache_loading_bar_shows_on_rank_0_only(tmp_path, capsys):
    import dataclasses

    from mossformer2.data.loaders import create_dataloaders
    from mossformer2.distributed import DistInfo
    from mossformer2.training.config import train_config_from_dict

    root = _make_wsj_folder(tmp_path / "d", [1000, 1000])
    cfg = train_config_from_dict({"model": {"sample_rate": SR}, "data": {
        "sample_rate": SR, "segment_seconds": 0.1, "train": str(root), "valid": str(root), "num_workers": 0,
        "cache_audio": True}})
    shown_bars = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, progress_bar=True))
    for rank, shown in ((1, False), (0, True)):
        create_dataloaders(shown_bars, DistInfo(rank=rank, world_size=2))
        assert ("loading audio" in capsys.readouterr().err) == shown, rank
    for setting in (False, None):  # None (the default): only on a terminal, which pytest's stderr is not
        create_dataloaders(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, progress_bar=setting)))
        assert "loading audio" not in capsys.readouterr().err


def test_mixtures_dropped_while_the_cache_loads_are_counted(tmp_path):
    root = _make_wsj_folder(tmp_path / "d", [1000, 1000, 1000])
    (root / "s2" / "u1.wav").write_bytes(b"RIFF garbage, not audio")
    cached = MixtureDataset(load_manifest(root), AudioStore(SR, cache=True, progress=False), skip_bad_files=True)
    assert len(cached) == 2 and cached.preload_skipped == 1


def test_several_training_sets_are_used_together(tmp_path):
    """data.train took one manifest: Libri2Mix train-100 + train-360 needed a hand-merged CSV (and `cat` of two
    CSVs made the second header a mixture)."""
    from mossformer2.data.loaders import build_datasets
    from mossformer2.training.config import load_train_config

    a = _make_wsj_folder(tmp_path / "a", [1000, 1000])
    b = _make_wsj_folder(tmp_path / "b", [1000], seed=1)  # a WHAM!-style set: mix_clean/ beside s1/, s2/
    (b / "mix").rename(b / "mix_clean")
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{sample_rate: {SR}}}\ndata: {{sample_rate: {SR}, segment_seconds: 0.05, "
                      f"num_workers: 0, train: [{a}, {b / 'mix_clean'}], valid: {a}}}\n")
    with pytest.raises(ValueError, match=r"^data\.train: mixture id 'u0' is in .*a and in .*mix_clean: the sets "
                                         r"overlap"):
        build_datasets(load_train_config(config), progress=False)
    for folder in ("mix_clean", "s1", "s2"):
        (b / folder / "u0.wav").rename(b / folder / "w0.wav")
    train, _ = build_datasets(load_train_config(config), progress=False)
    assert sorted(e.id for e in train.entries) == ["u0", "u1", "w0"]
    from mossformer2.data.manifests import load_manifests

    with pytest.raises(ValueError, match=r"names .*a more than once"):
        load_manifests([a, b / "mix_clean", a])


def test_a_premixed_configs_sets_reach_the_datasets(tmp_path):
    """data.train / data.valid / data.segment_seconds / data.max_valid_seconds of a config become the datasets'
    crops and caps (only their validation was tested)."""
    from mossformer2.data.loaders import build_datasets
    from mossformer2.training.config import train_config_from_dict

    train_root = _make_wsj_folder(tmp_path / "tr", [3000, 5000, 4000])
    valid_root = _make_wsj_folder(tmp_path / "cv", [3000, 6000], seed=1)
    cfg = train_config_from_dict({
        "model": {"encoder_embedding_dim": 16, "mossformer_sequence_dim": 16, "num_mossformer_layer": 1,
                  "sample_rate": SR},
        "data": {"sample_rate": SR, "train": str(train_root), "valid": str(valid_root), "segment_seconds": 0.25,
                 "max_valid_seconds": 0.5, "num_workers": 0}})
    train, valid = build_datasets(cfg, progress=False, is_main=False)
    assert len(train) == 3 and {train[i]["mix"].shape[-1] for i in range(3)} == {SR // 4}
    assert sorted(valid[i]["mix"].shape[-1] for i in range(2)) == [3000, SR // 2]  # whole, or capped at 0.5 s


def test_validation_cut_to_max_samples_keeps_the_utterances_start(tmp_path):
    root = _make_wsj_folder(tmp_path / "d", [5000])
    full = MixtureDataset(load_manifest(root), AudioStore(SR))[0]
    capped = MixtureDataset(load_manifest(root), AudioStore(SR), max_samples=4000)[0]
    np.testing.assert_array_equal(capped["mix"].numpy(), full["mix"].numpy()[:4000])
    np.testing.assert_array_equal(capped["sources"].numpy(), full["sources"].numpy()[:, :4000])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_file_with_nonfinite_samples_is_refused(tmp_path, bad):
    wave = np.full(800, 0.1, np.float32)
    wave[100] = bad
    path = tmp_path / "bad.wav"
    sf.write(path, wave, SR, subtype="FLOAT")
    with pytest.raises(BadAudioError, match="bad.wav: it contains NaN or infinite samples"):
        AudioStore(SR).load(path)

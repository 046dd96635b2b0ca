"""load_manifest: wsj0-2mix folders, LibriMix CSVs, list/scp files and their error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from mossformer2.data.manifests import UNFINISHED_NAME, MixtureEntry, load_manifest


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # the manifest loader never reads audio, only checks that files exist
    return path


def make_folder(root: Path, names: list[str], num_spks: int = 2) -> None:
    for name in names:
        touch(root / "mix" / name)
        for k in range(num_spks):
            touch(root / f"s{k + 1}" / name)


def test_folder_layout_pairs_by_relative_name_recursively(tmp_path):
    make_folder(tmp_path, ["b.wav", "a.wav", "sub/c.flac"], num_spks=3)
    touch(tmp_path / "mix" / "notes.txt")  # non-audio files are ignored
    touch(tmp_path / "mix" / "._a.wav")  # and hidden names: a macOS sidecar has no s1/s2 twin, and is no audio
    touch(tmp_path / "mix" / ".cache" / "d.wav")
    entries = load_manifest(tmp_path)
    assert [e.id for e in entries] == ["a", "b", "sub/c"]
    c = entries[2]
    assert c.mix == tmp_path / "mix" / "sub" / "c.flac"
    assert c.sources == [tmp_path / f"s{k}" / "sub" / "c.flac" for k in (1, 2, 3)]
    assert all(isinstance(e, MixtureEntry) for e in entries)


def test_folder_num_spks_limits_and_checks_source_folders(tmp_path):
    make_folder(tmp_path, ["a.wav"], num_spks=3)
    assert len(load_manifest(tmp_path, num_spks=3)[0].sources) == 3
    assert len(load_manifest(tmp_path)[0].sources) == 3  # evaluate: the folder says, the model is checked later
    with pytest.raises(FileNotFoundError, match="s4"):
        load_manifest(tmp_path, num_spks=4)


def test_folder_with_more_source_folders_than_speakers_is_refused(tmp_path):
    """A wsj0-3mix folder given to a 2-speaker model: s3/ was ignored and the model learnt from 3-speaker mixtures."""
    make_folder(tmp_path, ["a.wav"], num_spks=4)
    with pytest.raises(ValueError, match=r"has 4 source folders \(s1\.\.s4\) but 2 speakers were expected"):
        load_manifest(tmp_path, num_spks=2)


def test_folder_names_files_missing_in_a_source_folder(tmp_path):
    make_folder(tmp_path, ["a.wav", "b.wav"])
    (tmp_path / "s2" / "b.wav").unlink()
    with pytest.raises(FileNotFoundError, match=r"s2.*b\.wav"):
        load_manifest(tmp_path)
    (tmp_path / "s1" / "a.wav").unlink()  # every folder's gaps in one message, not one run per folder
    with pytest.raises(FileNotFoundError, match=r"in .*s1: a\.wav; 1 mixture\(s\) .* in .*s2: b\.wav"):
        load_manifest(tmp_path)


def test_folder_without_mix_or_sources_is_rejected(tmp_path):
    touch(tmp_path / "x" / "a.wav")
    with pytest.raises(ValueError, match="no 'mix/'"):
        load_manifest(tmp_path)
    touch(tmp_path / "mix" / "a.wav")
    with pytest.raises(ValueError, match="no source folders"):
        load_manifest(tmp_path)


def test_librimix_and_wham_folders_are_read_from_their_mixture_folder(tmp_path):
    """LibriMix / WHAM! keep mix_clean/, mix_both/ and mix_single/ beside s1/, s2/: they were refused with "no
    'mix/' subfolder" (WHAM! ships no CSV: a hand-written list was the only way)."""
    split = tmp_path / "wham" / "wav8k" / "min" / "tt"
    for name in ("a.wav", "b.wav"):
        for folder in ("mix_clean", "mix_both", "mix_single", "s1", "s2", "noise"):
            touch(split / folder / name)
    entries = load_manifest(split / "mix_both", num_spks=2)
    assert [e.id for e in entries] == ["a", "b"]
    assert entries[0].mix == split / "mix_both" / "a.wav"
    assert entries[0].sources == [split / "s1" / "a.wav", split / "s2" / "a.wav"]
    assert load_manifest(split / "mix_clean")[1].mix == split / "mix_clean" / "b.wav"
    with pytest.raises(ValueError, match=r"holds mix_clean/, mix_both/ beside its sources \(the LibriMix / WHAM! "
                                         r"layout\): pass the mixture folder itself, e.g. .*tt/mix_clean"):
        load_manifest(split)
    with pytest.raises(ValueError, match=r"one speaker plus noise .*speech enhancement"):
        load_manifest(split / "mix_single")
    with pytest.raises(ValueError, match=r"holds the sets tt: pass one of them, e.g. .*min/tt"):
        load_manifest(split.parent)


def test_librimix_csv_relative_and_absolute_paths(tmp_path):
    touch(tmp_path / "data" / "mix" / "m1.wav")
    touch(tmp_path / "data" / "s1" / "m1.wav")
    absolute = touch(tmp_path / "elsewhere" / "m1_s2.wav")
    csv_path = tmp_path / "data" / "mixture_test_mix_clean.csv"
    csv_path.write_text("mixture_ID,mixture_path,source_1_path,source_2_path,length\n"
                        f"m1,mix/m1.wav,s1/m1.wav,{absolute},16000\n")
    (entry,) = load_manifest(csv_path, num_spks=2)
    assert entry.id == "m1"
    assert entry.mix == tmp_path / "data" / "mix" / "m1.wav"
    assert entry.sources == [tmp_path / "data" / "s1" / "m1.wav", absolute]


def test_librimix_csv_errors_name_file_and_line(tmp_path):
    csv_path = tmp_path / "meta.csv"
    touch(tmp_path / "m.wav")
    touch(tmp_path / "a.wav")
    csv_path.write_text("mixture_ID,mixture_path,source_1_path,source_2_path\n"
                        "m,m.wav,a.wav,a.wav\n"
                        "n,m.wav,a.wav,missing.wav\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.wav \(line 3\)"):
        load_manifest(csv_path)
    with pytest.raises(ValueError, match="3 speakers"):
        load_manifest(csv_path, num_spks=3)
    csv_path.write_text("mixture_ID,mixture_path,source_1_path,source_2_path\nm,m.wav,a.wav,\n")
    with pytest.raises(ValueError, match="line 2: empty"):
        load_manifest(csv_path)
    csv_path.write_text("mixture_ID,mixture_path,source_2_path\nm,m.wav,a.wav\n")
    with pytest.raises(ValueError, match="source_1_path"):
        load_manifest(csv_path)
    csv_path.write_text("mixture_ID,mixture_path,source_1_path\nm,m.wav,a.wav\nm,m.wav,a.wav\n")
    with pytest.raises(ValueError, match="'m' appears more than once"):
        load_manifest(csv_path)


def test_list_file_comments_blank_lines_and_relative_paths(tmp_path):
    for name in ("a/mix.wav", "a/s1.wav", "a/s2.wav", "b/mix2.wav", "b/s1.wav", "b/s2.wav"):
        touch(tmp_path / name)
    scp = tmp_path / "test.scp"
    scp.write_text("# mixture s1 s2\n\n"
                   "a/mix.wav a/s1.wav a/s2.wav   # trailing comment\n"
                   f"  {tmp_path / 'b/mix2.wav'}\tb/s1.wav b/s2.wav\n")
    entries = load_manifest(scp)
    assert [e.id for e in entries] == ["mix", "mix2"]
    assert entries[0].sources == [tmp_path / "a" / "s1.wav", tmp_path / "a" / "s2.wav"]
    assert entries[1].mix == tmp_path / "b" / "mix2.wav"


def test_lists_and_csvs_saved_with_a_byte_order_mark_read_as_without(tmp_path):
    """Windows editors (Notepad, Excel's "CSV UTF-8") start a file with U+FEFF: it named the first path, or the
    CSV's first column, and the entry failed as missing although the file exists."""
    for name in ("mix.wav", "s1.wav", "s2.wav"):
        touch(tmp_path / name)
    scp = tmp_path / "test.scp"
    scp.write_bytes(b"\xef\xbb\xbfmix.wav s1.wav s2.wav\r\n")
    assert [e.mix for e in load_manifest(scp)] == [tmp_path / "mix.wav"]
    csv_path = tmp_path / "meta.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfmixture_path,source_1_path,source_2_path\r\nmix.wav,s1.wav,s2.wav\r\n")
    assert [e.sources for e in load_manifest(csv_path)] == [[tmp_path / "s1.wav", tmp_path / "s2.wav"]]


def test_paths_with_spaces_show_as_missing_files_not_as_repeated_ids(tmp_path):
    """`sp ace/mix/a.wav ...` lines split at the spaces: the error said "mixture id 'sp' appears more than once"."""
    lines = "".join(f"sp ace/mix/{n}.wav sp ace/s1/{n}.wav sp ace/s2/{n}.wav\n" for n in "ab")
    (tmp_path / "spaces.lst").write_text(lines)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        load_manifest(tmp_path / "spaces.lst")


def test_a_hash_inside_a_file_name_is_no_comment(tmp_path):
    """`take#2.wav` was cut to `take` (a comment then starts at any #); one that begins a word still is one."""
    for name in ("take#2.wav", "s1.wav", "s2.wav"):
        touch(tmp_path / name)
    scp = tmp_path / "test.scp"
    scp.write_text("#mix s1 s2\ntake#2.wav s1.wav s2.wav #comment\n")
    assert [e.mix for e in load_manifest(scp)] == [tmp_path / "take#2.wav"]


def test_list_duplicate_stems_get_unique_path_ids(tmp_path):
    for name in ("a/mix.wav", "b/mix.wav", "s.wav"):
        touch(tmp_path / name)
    lst = tmp_path / "list.txt"
    lst.write_text("a/mix.wav s.wav\nb/mix.wav s.wav\n")
    ids = [e.id for e in load_manifest(lst)]
    assert len(set(ids)) == 2 and ids[0].endswith("a/mix") and ids[1].endswith("b/mix")


def test_list_errors_name_file_and_line(tmp_path):
    for name in ("m.wav", "a.wav", "b.wav", "c.wav"):
        touch(tmp_path / name)
    lst = tmp_path / "list.txt"
    lst.write_text("m.wav a.wav b.wav\nm.wav a.wav b.wav c.wav\n")
    with pytest.raises(ValueError, match=r"list\.txt, line 2: 3 source\(s\), but line 1 has 2"):
        load_manifest(lst)
    lst.write_text("m.wav a.wav b.wav\nonlyone.wav\n")
    with pytest.raises(ValueError, match="line 2"):
        load_manifest(lst)
    lst.write_text("# header\nm.wav a.wav b.wav\n")
    with pytest.raises(ValueError, match="line 2: 2 source.*3 speakers"):
        load_manifest(lst, num_spks=3)
    lst.write_text("m.wav a.wav nope.wav\n")
    with pytest.raises(FileNotFoundError, match=r"nope\.wav \(line 1\)"):
        load_manifest(lst)
    assert load_manifest(lst, check_files=False)[0].sources[1].name == "nope.wav"
    lst.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no mixtures"):
        load_manifest(lst)


def test_missing_manifest_and_binary_list(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        load_manifest(tmp_path / "nope.csv")
    binary = tmp_path / "list.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(ValueError, match="not a text list"):
        load_manifest(binary)


def test_a_list_with_kaldi_utterance_ids_says_so(tmp_path):
    for name in ("m.wav", "a.wav", "b.wav"):
        touch(tmp_path / name)
    listing = tmp_path / "tr.scp"
    listing.write_text("id1 m.wav a.wav b.wav\n")
    with pytest.raises(ValueError, match=r"tr\.scp, line 1: the first field 'id1' is not an audio file but looks like "
                                         r"a Kaldi utterance id: the list format is 'mix s1 s2 \.\.\.' without ids"):
        load_manifest(listing, num_spks=2)
    listing.write_text("m.wav a.wav b.wav\n")  # the same files without the id
    assert load_manifest(listing, num_spks=2)[0].mix == tmp_path / "m.wav"


def test_librimix_csv_ids_come_from_its_mixture_id_column(tmp_path):
    """The CSV's mixture_ID names each mixture (scores per mixture, TensorBoard), not the file name; without one
    the mixture file's stem does."""
    for name in ("mix/a.wav", "s1/a.wav", "s2/a.wav", "mix/b.wav", "s1/b.wav", "s2/b.wav"):
        touch(tmp_path / name)
    csv_path = tmp_path / "meta.csv"
    csv_path.write_text("mixture_ID,mixture_path,source_1_path,source_2_path\n"
                        "4kf_0308-2035,mix/a.wav,s1/a.wav,s2/a.wav\n"
                        ",mix/b.wav,s1/b.wav,s2/b.wav\n")
    assert [e.id for e in load_manifest(csv_path)] == ["4kf_0308-2035", "b"]


def test_a_folder_that_mix_did_not_finish_is_refused(tmp_path):
    make_folder(tmp_path / "cv", ["u0.wav", "u1.wav"])
    (tmp_path / "cv" / UNFINISHED_NAME).write_text("mix/u2.wav\n")
    with pytest.raises(ValueError, match=r"a set that `mossformer2 mix` did not finish.*--overwrite"):
        load_manifest(tmp_path / "cv")


def test_a_list_whose_mixture_file_has_no_audio_suffix_is_read_not_taken_for_a_kaldi_id(tmp_path):
    """Only a first field that names no file looks like an utterance id: an existing mixture file without an audio
    suffix is a mixture."""
    for name in ("mix/u0", "s1/u0.wav", "s2/u0.wav"):
        touch(tmp_path / name)
    scp = tmp_path / "list.scp"
    scp.write_text("mix/u0 s1/u0.wav s2/u0.wav\n")
    (entry,) = load_manifest(scp)
    assert entry.mix == tmp_path / "mix" / "u0" and entry.id == "u0"


def test_an_upper_case_csv_suffix_is_read_as_a_csv(tmp_path):
    csv_path = tmp_path / "META.CSV"
    csv_path.write_text("mixture_ID,mix,s1,s2\nm,m.wav,a.wav,b.wav\n")
    with pytest.raises(ValueError, match="not a LibriMix metadata CSV .no 'mixture_path' column"):
        load_manifest(csv_path)

"""Dataset manifests: which mixture goes with which reference sources.

Three layouts are read, detected from the path:

- a **folder** in wsj0-2mix layout: ``<root>/mix/``, ``<root>/s1/``, ``<root>/s2/``, ... holding files with
  equal relative names (searched recursively, paired by the path relative to ``mix/``);
- a **LibriMix metadata CSV** with columns ``mixture_ID, mixture_path, source_1_path, source_2_path, ...``
  (extra columns such as ``length`` are ignored; relative paths are resolved against the CSV's folder);
- a **list / scp text file**: one mixture per line, ``mix s1 s2 ...`` separated by whitespace (ClearVoice
  format); comments (from a ``#`` that begins a word) and blank lines are ignored; relative paths are resolved
  against the list's folder.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mossformer2.audio import MIXTURE_FOLDERS, find_audio_files, has_audio_suffix  # hidden names skipped


@dataclass
class MixtureEntry:
    """One mixture and its reference sources (in speaker order s1, s2, ...)."""

    id: str
    mix: Path
    sources: list[Path]


def load_manifest(path: str | Path, num_spks: int | None = None, check_files: bool = True
                  ) -> list[MixtureEntry]:
    """Read a wsj0-2mix folder, a LibriMix metadata CSV or a ``mix s1 s2 ...`` list into entries.

    ``num_spks``: the expected number of sources per mixture (None: whatever the manifest has, consistently).
    ``check_files``: raise FileNotFoundError naming every listed file that does not exist.
    Raises ValueError for malformed manifests (naming the file and line), FileNotFoundError for missing files.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {path}")
    if num_spks is not None and num_spks < 1:
        raise ValueError(f"num_spks must be >= 1, got {num_spks}")
    if path.is_dir():
        if (path / UNFINISHED_NAME).exists():
            raise ValueError(f"{path} is a set that `mossformer2 mix` did not finish (the run was stopped; "
                             f"{UNFINISHED_NAME} lists its files): run that command again with --overwrite")
        entries = _load_folder(path, num_spks)
        line_numbers: list[int] | None = None  # the folder loader already paired existing files
    else:
        if path.suffix.lower() == ".csv" or _looks_like_librimix_csv(path):
            numbered = _load_librimix_csv(path, num_spks)
        else:
            numbered = _load_list(path, num_spks)
        line_numbers = [n for n, _ in numbered]
        entries = [e for _, e in numbered]
    if not entries:
        raise ValueError(f"manifest {path} lists no mixtures")
    if check_files and line_numbers is not None:  # first: a path with spaces shows here, not as a repeated id
        _check_files_exist(entries, line_numbers, path)
    _check_unique_ids(entries, path)
    return entries


def load_manifests(paths: str | Path | list[str | Path], num_spks: int | None = None) -> list[MixtureEntry]:
    """:func:`load_manifest` of one path, or of several whose mixtures are used together (their ids must not
    clash: each set's ids are its own)."""
    if isinstance(paths, (str, Path)):
        return load_manifest(paths, num_spks)
    if not paths:
        raise ValueError("the list of manifests is empty")
    named = [Path(os.path.expanduser(p)).absolute() for p in paths]
    twice = sorted({str(p) for p in named if named.count(p) > 1})
    if twice:
        raise ValueError(f"the list of manifests names {', '.join(twice)} more than once")
    entries: list[MixtureEntry] = []
    origin: dict[str, str] = {}
    for path in paths:
        for entry in load_manifest(path, num_spks):
            if entry.id in origin:
                raise ValueError(f"mixture id {entry.id!r} is in {origin[entry.id]} and in {path}: the sets overlap "
                                 "(or name different mixtures alike)")
            origin[entry.id] = str(path)
            entries.append(entry)
    return entries  # (mixtures of unequal speaker counts: MixtureDataset refuses them, as within one manifest)


def _looks_like_librimix_csv(path: Path) -> bool:
    with path.open(encoding="utf-8", errors="replace") as f:
        first = f.readline()
    return "mixture_path" in first and "," in first


def _audio_files(folder: Path) -> dict[str, Path]:
    """Relative POSIX path (with suffix) -> file, for every audio file below ``folder``."""
    return {p.relative_to(folder).as_posix(): p for p in find_audio_files(folder)}


def _last_source_folder(root: Path, start: int) -> int:
    """The k of the last of the contiguous source folders s{start+1}, s{start+2}, ... below ``root`` (``start``
    where there is none)."""
    k = start
    while (root / f"s{k + 1}").is_dir():
        k += 1
    return k


# LibriMix / WHAM! keep several mixtures of each example beside the sources: clean speech, speech + noise, one
# speaker + noise (mix_single: enhancement, not separation).
MIXTURE_VARIANTS = MIXTURE_FOLDERS[1:]  # LibriMix / WHAM!: mix_clean, mix_both, mix_single
# `mossformer2 mix` lists the files of a set here before it writes any and removes the list once the set is
# complete: a killed run leaves it behind, so that the next run notices its files and --overwrite can remove them,
# and so that a set cut short is not scored or trained on as if it were whole.
UNFINISHED_NAME = ".mix_unfinished.txt"
COMMENT = re.compile(r"(?<!\S)#")  # list files: a comment starts at a # that begins a word


def _load_folder(root: Path, num_spks: int | None) -> list[MixtureEntry]:
    """wsj0-2mix ``<root>/mix, s1, s2, ...``; or, given a LibriMix / WHAM! mixture folder itself
    (``<split>/mix_clean``, ``mix_both``), that folder with the sources beside it."""
    mix_dir = root / "mix"
    if root.name == "mix_single":
        raise ValueError(f"{root} holds one speaker plus noise in each mixture (speech enhancement), not a "
                         f"separation set: pass {root.parent / 'mix_clean'} or {root.parent / 'mix_both'}")
    if root.name in MIXTURE_VARIANTS and (root.parent / "s1").is_dir():
        mix_dir, root = root, root.parent
    elif not mix_dir.is_dir():
        raise ValueError(_layout_hint(root))
    if num_spks is None:
        num_spks = _last_source_folder(root, 0)
        if num_spks == 0:
            raise ValueError(f"{root} has 'mix/' but no source folders 's1/', 's2/', ...")
    elif (found := _last_source_folder(root, num_spks)) > num_spks:  # e.g. wsj0-3mix given to a 2-speaker model
        raise ValueError(f"{root} has {found} source folders (s1..s{found}) but {num_spks} speakers were expected: "
                         f"its mixtures hold {found} speakers")
    source_dirs = [root / f"s{k + 1}" for k in range(num_spks)]
    for d in source_dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"source folder {d} is missing ({num_spks} speakers expected)")
    mixes = _audio_files(mix_dir)
    if not mixes:
        raise ValueError(f"no audio files found under {mix_dir}")
    problems = []  # every source folder at once: one run shows all that is missing
    for d in source_dirs:
        missing = [rel for rel in mixes if not (d / rel).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            problems.append(f"{len(missing)} mixture(s) in {mix_dir} have no matching file in {d}: {shown}")
    if problems:
        raise FileNotFoundError("; ".join(problems))
    return [MixtureEntry(id=str(Path(rel).with_suffix("").as_posix()), mix=mix,
                         sources=[d / rel for d in source_dirs])
            for rel, mix in mixes.items()]


def _layout_hint(root: Path) -> str:
    """Why ``root`` is no mixture folder, with what to pass instead where the layout shows it."""
    variants = [name for name in MIXTURE_VARIANTS[:2] if (root / name).is_dir()]
    if variants:
        return (f"{root} holds {', '.join(v + '/' for v in variants)} beside its sources (the LibriMix / WHAM! "
                f"layout): pass the mixture folder itself, e.g. {root / variants[0]} (mix_clean: speech only; "
                "mix_both: speech + noise), or a LibriMix metadata CSV")
    splits = sorted(p.name for p in root.iterdir() if p.is_dir() and any(
        (p / name).is_dir() for name in ("mix", *MIXTURE_VARIANTS)))
    if splits:
        return f"{root} holds the sets {', '.join(splits)}: pass one of them, e.g. {root / splits[0]}"
    return (f"{root} is a folder but has no 'mix/' subfolder: expected the wsj0-2mix layout <root>/mix, "
            "<root>/s1, <root>/s2, ... (or a LibriMix / WHAM! mixture folder such as <split>/mix_clean)")


def resolve_listed_path(base: Path, value: str) -> Path:
    """A path written in a list file: ``~`` expanded, relative ones taken from the list's folder ``base``."""
    p = Path(os.path.expanduser(value))  # leaves an unknown ~name as it is (Path.expanduser raises)
    return p if p.is_absolute() else base / p


def strip_comment(line: str) -> str:
    """``line`` without its comment: a ``#`` at its start or after white space, as in a shell (``a#b.wav`` is a
    file name; it was cut to ``a``)."""
    return COMMENT.split(line, maxsplit=1)[0]


def list_file_lines(path: Path, expected: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line of a list file that holds more than a ``#`` comment (stripped);
    ``expected`` names the line format for the error about a file that is not text."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is no path
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a text list (expected lines '{expected}'): {err}") from err
    for number, raw in enumerate(text.splitlines(), start=1):
        line = strip_comment(raw).strip()
        if line:
            yield number, line


def _load_librimix_csv(path: Path, num_spks: int | None) -> list[tuple[int, MixtureEntry]]:
    """Entries with the CSV line number each came from."""
    base = path.parent
    with path.open(newline="", encoding="utf-8-sig") as f:  # a byte-order mark would rename the first column
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "mixture_path" not in columns:
            raise ValueError(f"{path}: not a LibriMix metadata CSV (no 'mixture_path' column; columns are "
                             f"{columns})")
        source_columns = sorted((c for c in columns if re.fullmatch(r"source_\d+_path", c)),
                                key=lambda c: int(c.split("_")[1]))
        expected = [f"source_{k + 1}_path" for k in range(len(source_columns))]
        if source_columns != expected or not source_columns:
            raise ValueError(f"{path}: source columns must be source_1_path, source_2_path, ... (found "
                             f"{source_columns or 'none'})")
        if num_spks is not None and len(source_columns) != num_spks:
            raise ValueError(f"{path}: has {len(source_columns)} source columns but {num_spks} speakers "
                             f"were expected (model.num_spks={len(source_columns)} for this set)")
        entries = []
        for line_no, row in enumerate(reader, start=2):
            values = [row.get("mixture_path")] + [row.get(c) for c in source_columns]
            if any(v is None or not v.strip() for v in values):
                raise ValueError(f"{path}, line {line_no}: empty or missing path field")
            mix = resolve_listed_path(base, values[0].strip())
            mixture_id = (row.get("mixture_ID") or "").strip() or mix.stem
            entries.append((line_no, MixtureEntry(id=mixture_id, mix=mix,
                                                  sources=[resolve_listed_path(base, v.strip()) for v in values[1:]])))
    return entries


def _load_list(path: Path, num_spks: int | None) -> list[tuple[int, MixtureEntry]]:
    """Entries with the list line number each came from."""
    base = path.parent
    entries: list[tuple[int, MixtureEntry]] = []
    first_fields: tuple[int, int] | None = None  # (field count, line number) of the first entry
    for line_no, line in list_file_lines(path, "mix s1 s2 ..."):
        fields = line.split()
        if len(fields) < 2:
            raise ValueError(f"{path}, line {line_no}: expected 'mix s1 s2 ...' (a mixture and its sources), "
                             f"got {len(fields)} field(s)")
        if _is_utterance_id(fields, base):
            raise ValueError(f"{path}, line {line_no}: the first field {fields[0]!r} is not an audio file but looks "
                             "like a Kaldi utterance id: the list format is 'mix s1 s2 ...' without ids (remove "
                             "the first column, e.g. `cut -d' ' -f2-`)")
        if num_spks is not None and len(fields) != num_spks + 1:
            raise ValueError(f"{path}, line {line_no}: {len(fields) - 1} source(s) but {num_spks} speakers "
                             "were expected")
        if first_fields is None:
            first_fields = (len(fields), line_no)
        elif len(fields) != first_fields[0]:
            raise ValueError(f"{path}, line {line_no}: {len(fields) - 1} source(s), but line "
                             f"{first_fields[1]} has {first_fields[0] - 1}: every line needs the same count")
        mix = resolve_listed_path(base, fields[0])
        entries.append((line_no, MixtureEntry(id=mix.stem, mix=mix,
                                              sources=[resolve_listed_path(base, f) for f in fields[1:]])))
    # Equal stems in different folders: fall back to the full mixture path as id so that ids stay unique.
    if len({e.id for _, e in entries}) != len(entries):
        for _, e in entries:
            e.id = e.mix.with_suffix("").as_posix()
    return entries


def _is_utterance_id(fields: list[str], base: Path) -> bool:
    """A Kaldi-style ``utt_id mix s1 ...`` line: a first field without an audio suffix that names no file, followed
    by audio names (``mossformer2 separate`` tells ``utt_id path`` lines by the same :func:`has_audio_suffix`)."""
    return (not has_audio_suffix(fields[0]) and all(has_audio_suffix(f) for f in fields[1:])
            and not resolve_listed_path(base, fields[0]).is_file())


def _check_unique_ids(entries: list[MixtureEntry], path: Path) -> None:
    seen: set[str] = set()
    for e in entries:
        if e.id in seen:
            raise ValueError(f"{path}: mixture id {e.id!r} appears more than once")
        seen.add(e.id)


def _check_files_exist(entries: list[MixtureEntry], line_numbers: list[int], path: Path) -> None:
    missing = [f"{p} (line {n})" for e, n in zip(entries, line_numbers) for p in (e.mix, *e.sources)
               if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{path}: {len(missing)} listed file(s) do not exist: {shown}")

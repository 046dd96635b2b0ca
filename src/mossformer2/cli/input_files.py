"""What ``mossformer2 separate`` reads and where its outputs go: files, folders, globs and text lists expanded into
input files, their mirrored output folders, and each torchrun rank's share."""

from __future__ import annotations

import codecs
import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

LIST_EXTENSIONS = {".txt", ".lst", ".list", ".scp"}


@dataclass
class Inputs:
    files: list[Path] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)
    excluded: int = 0  # files a folder or pattern found inside an output folder within it (earlier outputs)
    beside_inputs: int = 0  # files a folder or pattern found named as outputs beside their input (a_s1.wav, a.wav)
    roots: list[Path] = field(default_factory=list)  # absolute; the folders the inputs name (mirrored_out_dirs)


def _list_entries(list_file: Path) -> list[Path]:
    """Paths in a text list: one path a line (spaces and ``#`` allowed if the whole line names a file),
    ``mix s1 s2`` lines (first field) or Kaldi ``id path`` lines; otherwise a ``#`` that begins a word starts a
    comment (``take#2.wav`` is a name).

    A relative entry is taken from the current folder where its file is found there, else from the list's folder;
    a missing one as the list's other relative files were (from the list's folder if one was found only there),
    so that the outputs' layout does not change once it arrives."""
    from mossformer2.audio import has_audio_suffix
    from mossformer2.data.manifests import strip_comment

    from_list_folder = False  # whether a relative file the list names was found only in the list's folder
    missing: list[int] = []  # indices of relative entries found nowhere (resolved once all lines are read)

    def locate(text: str) -> Path | None:
        """Where a field's file is (noting when only the list's folder has it), or None where it is not."""
        nonlocal from_list_folder
        path = Path(os.path.expanduser(text))
        if path.is_absolute() or path.exists():
            return path if path.exists() else None
        if (list_file.parent / path).exists():
            from_list_folder = True
            return list_file.parent / path
        return None

    def is_file(text: str) -> bool:
        return (found := locate(text)) is not None and found.is_file()

    def entry(text: str) -> Path:
        found = locate(text)
        if found is None:
            missing.append(len(entries))
            return Path(os.path.expanduser(text))
        return found

    entries: list[Path] = []
    for number, line in enumerate(_list_text(list_file).splitlines()):
        if line.rstrip().endswith("|"):  # a Kaldi "id command |" entry: its audio comes out of a command
            raise ValueError(f"line {number + 1} is a command (ends in '|'), which is not run: write its audio to a "
                             "file and list that")
        if line.strip() and is_file(line.strip()):
            entries.append(entry(line.strip()))
            continue
        fields = strip_comment(line).split()
        if not fields:
            continue
        # "utt_id path": the path is the entry, also when it is missing (the error then names the missing file);
        # "mix s1 s2": the mixture, also when it is missing (its s1 was separated instead, without a word)
        kaldi = len(fields) == 2 and has_audio_suffix(fields[1]) and not has_audio_suffix(fields[0])
        for other in fields[1:]:  # (where the list's other files are says where its missing ones would be)
            locate(other)
        named_id = not is_file(fields[0]) and not has_audio_suffix(fields[0])
        if len(fields) > 1 and named_id and (kaldi or is_file(fields[1])):
            entries.append(entry(fields[1]))
        else:
            entries.append(entry(fields[0]))
    if from_list_folder:  # a relative file found only in the list's folder: the list names files from there
        for index in missing:
            if not entries[index].is_absolute():
                entries[index] = list_file.parent / entries[index]
    return entries


def _list_text(list_file: Path) -> str:
    """A list file's text. Decoded as the OS decodes file names: on POSIX a name is bytes, and a Latin-1 name in a
    list still names its file (a strict UTF-8 read failed the whole run). A byte-order mark (Windows editors) is no
    path; UTF-16 with one (Notepad's "Unicode", PowerShell 5's ``>``) is read as such, and UTF-32."""
    data = list_file.read_bytes()
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # (UTF-32-LE's mark begins as UTF-16-LE's)
        text = data.decode("utf-32")
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = data.decode("utf-16")
    else:
        text = os.fsdecode(data.removeprefix(codecs.BOM_UTF8))
    if "\x00" in text:
        raise ValueError("it holds NUL bytes: not a text list (binary, or UTF-16 without a byte-order mark: save it "
                         "as UTF-8)")
    return text


def outputs_beside_inputs(files: list[Path]) -> set[Path]:
    """The files named as ``separate`` names outputs (``<stem>_s<N>.<ext>``) that lie beside an input of that stem
    (``a_s1.wav`` beside ``a.mp3``; ``a_s1_s2.wav`` beside ``a_s1.wav``): a run that wrote into its inputs' folder
    left them, and a later scan of that folder would separate them again."""
    stems = {(f.parent, f.stem) for f in files}
    return {f for f in files
            if (parts := f.stem.rsplit("_s", 1))[-1].isdigit() and len(parts) == 2 and (f.parent, parts[0]) in stems}


def _pattern_root(pattern: str) -> Path:
    """The folder a glob pattern searches: its parts before the first one with a wildcard."""
    parts = Path(pattern).parts
    return Path(*parts[:next(i for i, part in enumerate(parts) if glob.has_magic(part))])


def collect_inputs(specs: list[str], exclude: Path | None = None) -> Inputs:
    """Expand files, folders (recursive, hidden names skipped), globs and list files into a sorted, de-duplicated
    file list, and note the folder each input names (``Inputs.roots``). An input that yields no file is an error.

    Folders and patterns skip what lies under ``exclude`` (the output folder: separating ``.`` into ``./out``
    twice must not separate the first run's outputs) and outputs beside their inputs (``outputs_beside_inputs``);
    files named one by one are always taken.
    """
    from mossformer2.audio import find_audio_files  # lazy: `mossformer2 --help` stays light

    found = Inputs()
    files: list[Path] = []
    skip = Path(os.path.expanduser(exclude)).resolve() if exclude is not None else None

    def kept(spec: str, matches: list[Path], none_found: str, root: Path) -> list[Path]:
        # Only an output folder inside the scanned one holds earlier outputs the scan would find (`. -o ./out`).
        # Written into the scanned folder itself (-o = that folder) they sit beside their inputs, where
        # outputs_beside_inputs finds them; into a folder around it (data/raw -o data), out of the scan's reach.
        root = root.resolve()
        inside = skip is not None and skip != root and skip.is_relative_to(root)
        outside = [p for p in matches if not inside or not p.resolve().is_relative_to(skip)]
        found.excluded += len(matches) - len(outside)
        earlier = outputs_beside_inputs(outside)
        found.beside_inputs += len(earlier)
        if not matches:
            found.errors.append((spec, none_found))
        elif not outside:
            found.errors.append((spec, f"all {len(matches)} file(s) found lie inside the output folder {exclude}"))
        return [p for p in outside if p not in earlier]

    for spec in specs:
        path = Path(os.path.expanduser(spec))
        if path.is_dir():
            files.extend(kept(spec, find_audio_files(path), "no audio files in the folder", path))
            found.roots.append(path)
        elif path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
            try:
                entries = _list_entries(path)
            except (OSError, ValueError) as err:  # unreadable, or undecodable where names are not bytes
                found.errors.append((spec, f"cannot read the list file: {err}"))
                continue
            if not entries:
                found.errors.append((spec, "the list names no file"))
                continue
            files.extend(entries)
            # The entries' common folder: it changes only when the list does (the list's own folder would put
            # absolute entries elsewhere, e.g. a ClearVoice .scp, under OUT/their/whole/path).
            found.roots.append(Path(os.path.commonpath([os.path.abspath(p.parent) for p in entries])))
        elif path.is_file():
            files.append(path)
            found.roots.append(path.parent)
        elif glob.has_magic(spec):
            pattern = os.path.expanduser(spec)
            matches = [Path(p) for p in glob.glob(pattern, recursive=True)]
            files.extend(kept(spec, [p for p in matches if p.is_file()], "the pattern matches no file",
                              _pattern_root(pattern)))
            found.roots.append(_pattern_root(pattern))
        elif spec == "-" or path.exists():
            found.errors.append((spec, "not a regular file: standard input, pipes and devices are not read (write "
                                       "the audio to a file first)"))
        else:
            found.errors.append((spec, "no such file or folder"))
    # Absolute, but symlinks kept: outputs take the name and folder the user sees, not a link target's (git-annex,
    # DVC and the Hugging Face cache link meaningful names to content-hashed files).
    found.files = sorted({Path(os.path.abspath(p)) for p in files})
    found.roots = [Path(os.path.abspath(p)) for p in found.roots]
    return found


def mirrored_out_dirs(files: list[Path], out_dir: Path, roots: Sequence[Path] = ()) -> dict[Path, Path]:
    """Output folder per input file: its folder relative to one root, under ``out_dir``.

    The root is the common folder of ``roots``, the folders the inputs name (``Inputs.roots``), so the layout
    depends on the command line and the lists, not on which files a folder or glob holds today: a rerun after new
    files arrive finds its earlier outputs and skips them. One root for all inputs keeps equal names in different
    named folders apart (``separate A B``: ``OUT/A/x_s1.wav`` and ``OUT/B/x_s1.wav``). Absolute paths.
    """
    if not files:
        return {}
    # The files' own folders lie under the roots and change nothing (but for a glob such as '*/../x.wav').
    root = Path(os.path.commonpath([*map(str, roots), *(str(f.parent) for f in files)]))
    return {f: out_dir / f.parent.relative_to(root) for f in files}


def shard_files(files: list[Path], rank: int, world_size: int) -> list[Path]:
    """Files ``i`` with ``i % world_size == rank`` of the sorted list (torchrun ranks)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    return [f for i, f in enumerate(sorted(files)) if i % world_size == rank]

"""``mossformer2 separate``'s plan, settled before anything is separated: which inputs to separate, skip or refuse,
whether their outputs can be written as asked, and which inputs share a forward pass.

A request that would fail for every input (or lose one) is refused here as a whole, with one message."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mossformer2.separation import Separator

Plan = dict[Path, list[Path]]  # input -> its speaker files, in speaker order
Headers = dict[Path, Any]  # input -> audio.audio_header (None: read_audio decides)


def check_plan(files: list[Path], plan: Plan, subtype: str) -> None:
    """Refuse float samples for FLAC outputs (write_audio would refuse each one) and outputs that would replace an
    input of the same run (`separate *.wav -o .` twice: a.wav's a_s1.wav is an input the second time)."""
    flac = [f for f in files if plan[f][0].suffix == ".flac"]
    if subtype == "FLOAT" and flac:
        raise ValueError(f"--subtype FLOAT: FLAC stores integer samples only, and {len(flac)} input(s) would be "
                         f"written as FLAC (e.g. {flac[0].name}); add --format wav, or use --subtype PCM_24")
    def where(path: Path) -> Path:  # the output name itself is not resolved: the atomic rename replaces a link
        return path.parent.resolve() / path.name

    # Compared with symlinked folders resolved: an output may neither replace an input nor its link target.
    taken = {where(f) for f in files} | {f.resolve() for f in files}
    overwritten = [(f, out) for f in files for out in plan[f] if where(out) in taken]
    if overwritten:
        source, output = overwritten[0]
        raise ValueError(f"refusing to overwrite inputs: {output}, an output of {source.name}, is also an input of "
                         f"this run ({len(overwritten)} such output(s)); choose another -o folder, or leave earlier "
                         "outputs out of the inputs")


def output_clashes(files: list[Path], plan: Plan, plot: bool = False) -> dict[Path, Path]:
    """Inputs whose outputs would overwrite those of an earlier input (a.wav and a.mp3 -> a_s1.wav; with ``plot``
    also a.wav and a.flac -> a_spectrogram.png), each with that earlier input. Called with all files, before
    sharding, so that every rank sees the same clashes."""
    from mossformer2.separation.outputs import output_files

    owner: dict[Path, Path] = {}
    clashes: dict[Path, Path] = {}
    for f in files:
        outputs = output_files(plan[f], plot)
        first = next((owner[p] for p in outputs if p in owner), None)
        if first is not None:
            clashes[f] = first
        else:
            owner.update({p: f for p in outputs})
    return clashes


@dataclass
class Work:
    todo: list[Path] = field(default_factory=list)  # to separate
    plot_only: list[Path] = field(default_factory=list)  # --plot: the speaker files exist, the spectrogram does not
    skipped: int = 0  # every output exists
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)


def select_work(files: list[Path], plan: Plan, clashes: dict[Path, Path], overwrite: bool, plot: bool,
                say: Callable[[str], None]) -> Work:
    """Sort ``files`` (this rank's) into those to separate, to skip (``say`` why) and to refuse: a clash, or some
    outputs already there without --overwrite."""
    from mossformer2.separation.outputs import output_files

    work = Work()
    for f in files:
        if f in clashes:
            work.failed.append((str(f), f"its outputs would overwrite those of {clashes[f]}; rename one of them"))
            continue
        outputs = output_files(plan[f], plot)
        folder = next((p for p in outputs if p.is_dir()), None)
        if folder is not None:  # no earlier output (skipped as done, the input stayed unseparated), nor replaceable
            work.failed.append((str(f), f"{folder} is a folder, where an output file goes: move or rename it"))
            continue
        if not overwrite:
            out_dir = plan[f][0].parent
            if plot and all(p.exists() for p in plan[f]) and not outputs[-1].exists():
                say(f"skipping {f}: outputs exist in {out_dir}; writing only its missing spectrogram")
                work.plot_only.append(f)  # counted as skipped once the spectrogram is written
                continue
            if all(p.exists() for p in outputs):
                say(f"skipping {f}: outputs exist in {out_dir} (use --overwrite to replace)")
                work.skipped += 1
                continue
            problem = existing_outputs_problem(outputs)
            if problem is not None:
                work.failed.append((str(f), problem))
                continue
        work.todo.append(f)
    return work


def existing_outputs_problem(outputs: list[Path]) -> str | None:
    """Why an input whose ``outputs`` partly exist must not be separated without --overwrite (``None``: none or
    all exist): a lone file with an output's name (a reference saved there, another tool's file) is not ours to
    replace, and this tool writes an input's outputs all together."""
    existing = [p for p in outputs if p.exists()]
    if not existing or len(existing) == len(outputs):
        return None
    missing = next(p for p in outputs if not p.exists())
    return (f"not separated: {existing[0]} exists but {missing.name} does not, so it is not a complete earlier "
            "output of this input; move it away, or pass --overwrite to replace it")


def check_outputs_writable(plan: Plan, infos: Headers, channels: str, output_rate: int | None,
                           subtype: str) -> None:
    """Refuse inputs whose outputs' format cannot hold their channels and rate (FLAC: at most 8, up to 655350 Hz):
    writing would refuse each file only after its separation."""
    from mossformer2.audio import check_writable

    unwritable: list[tuple[Path, ValueError]] = []
    for f, info in infos.items():
        if info is None:
            continue
        try:
            check_writable(plan[f][0].suffix[1:], info.channels if channels == "each" else 1,
                           output_rate or info.samplerate, subtype)
        except ValueError as err:
            unwritable.append((f, err))
    if unwritable:
        raise ValueError(f"{len(unwritable)} of {len(infos)} input(s) cannot be written as asked (e.g. "
                         f"{unwritable[0][0].name}): {unwritable[0][1]}")


def too_short_for_export(sep: Separator, infos: Headers, chunk_seconds: float | None,
                         overlap_seconds: float) -> dict[Path, str]:
    """For an ONNX export of one input length, checked once per file up front: the inputs shorter than the export,
    with the reason (each fails alone: no setting helps it). Other lengths mean chunk settings that do not fit the
    export, which would fail file after file: refused at once."""
    if sep.fixed_length is None:
        return {}
    wrong = {f: problem for f, info in infos.items()
             if info is not None and (problem := sep.fixed_length_error(info.frames, info.samplerate))}
    too_short = {f: problem for f, problem in wrong.items()
                 if sep.shorter_than_fixed_length(infos[f].frames, infos[f].samplerate)}
    settings = [f for f in wrong if f not in too_short]
    if settings:
        chunk = "none" if chunk_seconds is None else f"{chunk_seconds:g}"
        raise ValueError(f"--chunk-seconds {chunk} / --overlap-seconds {overlap_seconds:g} do "
                         f"not fit the export: {len(settings)} of {len(infos)} input(s) would run passes of "
                         f"another length (e.g. {settings[0].name}): {wrong[settings[0]]}")
    return too_short


def batch_groups(infos: Headers, sep: Separator) -> list[list[Path]]:
    """The inputs in groups that share forward passes. Short files are batched, sorted by length and zero-padded
    with their true lengths when the model takes them, else only files of identical shape; long files (and those
    without a header) run alone, in batched chunks."""
    from mossformer2.separation.batching import make_batches

    if sep.batch_size <= 1 or sep.stitching != "aligned":
        return [[f] for f in infos]
    groups: list[list[Path]] = []
    shapes: list[tuple[Path, tuple[int, int, int]]] = []
    singles: list[Path] = []
    for f, info in infos.items():
        if info is None or info.frames / info.samplerate > sep.chunk / sep.sample_rate:
            singles.append(f)
        else:
            shapes.append((f, (info.frames, info.samplerate, info.channels)))
    # One rate per batch (a batch is separated at one input rate); lengths in input samples.
    for rate in sorted({key[1] for _, key in shapes}):
        members = [(f, key) for f, key in shapes if key[1] == rate]
        # Padded batches sort by length; equal-length batches need equal shapes, ranked by length.
        key_rank = {key: i for i, key in enumerate(sorted({key for _, key in members}))}
        sizes = [key[0] if sep.pads_batches else key_rank[key] for _, key in members]
        batches = make_batches(sizes, sep.batch_size, padded=sep.pads_batches)
        groups.extend([members[i][0] for i in batch] for batch in batches)
    groups.extend([f] for f in singles)
    return groups

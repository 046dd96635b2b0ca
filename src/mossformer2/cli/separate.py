"""``mossformer2 separate``: separate files, folders, globs or lists of recordings into one file per speaker."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mossformer2.cli import (
    add_refinement_arguments,
    add_separator_arguments,
    describe_refinements,
    load_chosen_model,
    model_ref,
    refinement_options,
)
from mossformer2.cli.input_files import Inputs, collect_inputs, inputs_overwritten, mirrored_out_dirs, shard_files

# Also importable from here (tests do); run() reads collect_inputs and _load_model through this module's globals, so
# that patching them here takes effect.
__all__ = ["Inputs", "add_parser", "collect_inputs", "mirrored_out_dirs", "run", "shard_files"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "separate", help="separate recordings into one file per speaker",
        description="Separate each INPUT (audio files, folders searched recursively, glob patterns, or text lists "
                    "with one path a line / ClearVoice .scp) into OUT_DIR/<stem>_s1.<ext>, <stem>_s2.<ext>, ..., "
                    "mirroring the input folders: a file's output folder is its folder relative to the inputs as "
                    "named (a folder itself, a glob's folder before its first wildcard, a named file's folder, the "
                    "common folder of a list's entries; the common folder of these when there are several), so "
                    "reruns find earlier outputs. Folder scans skip hidden names (.*). Any length, format, sample "
                    "rate and channel count.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="audio file, folder, glob or list file (.txt, .lst, .list, .scp)")
    parser.add_argument("-o", "--out-dir", required=True, help="output folder")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint",
                        help="checkpoint file or folder, hub id (OWNER/NAME), or an export (.onnx or TorchScript)")
    source.add_argument("--model", help="named model: 'default' (built in) or MossFormer2_SS_16K / a hub id")
    parser.add_argument("--backend", choices=["auto", "torch", "onnxruntime"], default="auto",
                        help="onnxruntime runs an exported .onnx checkpoint without torch's model code")
    add_separator_arguments(parser)
    parser.add_argument("--channels", choices=["mix", "each"], default="mix",
                        help="mix: downmix to mono; each: separate every channel (multichannel outputs; each "
                             "channel's speakers are matched to the first channel's order, except with "
                             "--stitching clearvoice)")
    parser.add_argument("--output-rate", default="input",
                        help="'input' (default) or a rate in Hz, at least 1000, e.g. 16000")
    parser.add_argument("--format", choices=["wav", "flac"], default=None,
                        help="output format (default: the input's if wav/flac, else wav)")
    parser.add_argument("--subtype", choices=["PCM_16", "PCM_24", "FLOAT"], default="PCM_16",
                        help="output sample format (default PCM_16; FLOAT needs wav)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="chunks / short files per forward pass; files are sorted by length and "
                             "zero-padded with their true lengths (default 1)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="on CUDA, replay one captured CUDA graph per chunk shape (lower latency)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the network's layers with torch.compile (our MossFormer2 only; for CUDA, "
                             "with --cuda-graphs: faster once compiled, which takes 30-60 s on the first input and "
                             "again on the first of another length; slower on the CPU, where it needs float32)")
    add_refinement_arguments(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing outputs (default: skip an input whose outputs all exist; refuse one "
                             "where only some exist)")
    parser.add_argument("--plot", action="store_true",
                        help="also write <stem>_spectrogram.png per input (from the existing outputs where only the "
                             "plot is missing)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars and no per-file messages, only warnings, errors and the summary "
                             "(bars are off anyway when stderr is not a terminal)")
    return parser


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def _parse_output_rate(value: str) -> int | None:
    if value.lower() == "input":
        return None
    try:
        rate = int(value)
    except ValueError:
        raise ValueError(f"--output-rate must be 'input' or a rate in Hz, got {value!r}") from None
    from mossformer2.audio import check_sample_rate_option

    return check_sample_rate_option(rate, "--output-rate")


# -- run --------------------------------------------------------------------------------------------------------


def _load_model(args: argparse.Namespace, device: str):
    ref = model_ref(args)
    from mossformer2.utils import is_onnx_path

    if args.backend == "onnxruntime" and not is_onnx_path(ref):
        raise ValueError("--backend onnxruntime needs --checkpoint MODEL.onnx (see `mossformer2 export`)")
    return load_chosen_model(ref, device, announce=not args.quiet)


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


def plot_from_outputs(input_path: Path, outputs: list[Path]) -> Path:
    """Write the spectrogram of an input from its existing speaker files (no separation); returns its path."""
    import numpy as np

    from mossformer2.audio import read_audio
    from mossformer2.separation.separator import spectrogram_path, write_spectrogram

    wave, rate = read_audio(input_path)
    speakers = [read_audio(p) for p in outputs]
    if len({w.shape for w, _ in speakers}) != 1:
        raise ValueError(f"cannot plot from the existing outputs {outputs[0].name}, ...: their lengths or channel "
                         "counts differ (pass --overwrite to separate again)")
    return write_spectrogram(spectrogram_path(outputs[0]), np.stack([w for w, _ in speakers]), speakers[0][1],
                             wave, rate, title=input_path.name)


def _raise_if_compile_failed(err: BaseException, compiling: bool) -> None:
    """With --compile, an error of torch.compile itself (no C++ compiler, Triton missing, a compiler bug) would
    fail every file the same way: end the run with one message instead of one per file."""
    if compiling and type(err).__module__.startswith(("torch._dynamo", "torch._inductor")):
        cause = getattr(err, "inner_exception", None) or err  # BackendCompilerFailed wraps the compiler's error
        text = str(cause).strip()
        reason = f"{type(cause).__name__}: {text.splitlines()[0]}" if text else type(cause).__name__
        raise ValueError(f"compiling the network failed (--compile): {reason}; run without --compile") from err


def run(args: argparse.Namespace) -> int:
    import logging

    from tqdm import tqdm

    from mossformer2.audio import audio_header, check_writable, read_audio
    from mossformer2.separation import Separator, output_paths, write_separation
    from mossformer2.separation.batching import make_batches
    from mossformer2.separation.separator import spectrogram_path, warnings_about
    from mossformer2.utils import bar_disabled, check_folder_creatable, make_folder

    if args.quiet:  # "only warnings, errors and the summary": not our INFO notes (which weights a file gives, ...)
        logging.getLogger("mossformer2").setLevel(logging.WARNING)
    output_rate = _parse_output_rate(args.output_rate)
    if args.plot:
        from mossformer2.plotting import require_matplotlib

        require_matplotlib()  # before separating anything
    check_folder_creatable(args.out_dir, "output folder")  # created once every option and input is checked
    rank, world_size, local_rank = _distributed()
    device = args.device
    if device == "auto" and world_size > 1:
        import torch

        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    def say(message: str) -> None:  # per-run and per-file notes on stderr, silenced by --quiet
        if not args.quiet:
            print(message, file=sys.stderr)

    # The inputs before the model (seconds for a large checkpoint): a mistyped only input fails at once.
    inputs = collect_inputs(args.inputs, exclude=Path(args.out_dir))
    if inputs.excluded and rank == 0:
        say(f"ignoring {inputs.excluded} file(s) found inside the output folder {args.out_dir}")
    failed: list[tuple[str, str]] = list(inputs.errors) if rank == 0 else []
    if not inputs.files:
        if rank == 0 and not failed:
            raise ValueError("nothing to separate: the inputs name no audio file")
        return _summary(rank, world_size, 0, 0, failed, 0.0, 0.0)
    model = _load_model(args, device)
    show_bars = False if args.quiet else None  # None: only on a terminal (no \r and cursor codes in logs)
    sep = Separator(model, device=device, dtype=args.dtype, chunk_seconds=args.chunk_seconds,
                    overlap_seconds=args.overlap_seconds, stitching=args.stitching, normalize=args.normalize,
                    batch_size=args.batch_size, channels=args.channels,
                    backend=args.backend, progress=show_bars, cuda_graphs=args.cuda_graphs,
                    compile_layers=args.compile,
                    **refinement_options(args))

    if any(sep.refinements.values()) and rank == 0:
        say(f"refinements: {describe_refinements(sep)}")

    out_dirs = mirrored_out_dirs(inputs.files, Path(args.out_dir), inputs.roots)
    plan = {f: output_paths(f, out_dirs[f], sep.num_spks, args.format) for f in inputs.files}
    flac = [f for f in inputs.files if plan[f][0].suffix == ".flac"]
    if args.subtype == "FLOAT" and flac:  # before separating anything: write_audio would refuse every one
        raise ValueError(f"--subtype FLOAT: FLAC stores integer samples only, and {len(flac)} input(s) would be "
                         f"written as FLAC (e.g. {flac[0].name}); add --format wav, or use --subtype PCM_24")
    overwritten = inputs_overwritten(inputs.files, plan)
    if overwritten:  # never lose an input (`separate *.wav -o .` twice: a.wav's a_s1.wav is an input the second time)
        source, output = overwritten[0]
        raise ValueError(f"refusing to overwrite inputs: {output}, an output of {source.name}, is also an input of "
                         f"this run ({len(overwritten)} such output(s)); choose another -o folder, or leave earlier "
                         "outputs out of the inputs")
    # Over all files, before sharding, so that every rank sees the same clashes (a.wav and a.mp3 -> a_s1.wav).
    owner: dict[Path, Path] = {}
    clashes: dict[Path, Path] = {}
    for f in inputs.files:
        first = next((owner[p] for p in plan[f] if p in owner), None)
        if first is not None:
            clashes[f] = first
        else:
            owner.update({p: f for p in plan[f]})
    todo: list[Path] = []
    plot_only: list[Path] = []  # --plot: the speaker files exist, the spectrogram does not
    skipped = 0
    for f in shard_files(inputs.files, rank, world_size):
        if f in clashes:
            failed.append((str(f), f"its outputs would overwrite those of {clashes[f]}; rename one of them"))
            continue
        if not args.overwrite:
            outputs = [*plan[f], spectrogram_path(plan[f][0])] if args.plot else plan[f]
            if args.plot and all(p.exists() for p in plan[f]) and not outputs[-1].exists():
                say(f"skipping {f}: outputs exist in {out_dirs[f]}; writing only its missing spectrogram")
                plot_only.append(f)  # counted as skipped once the spectrogram is written
                continue
            if all(p.exists() for p in outputs):
                say(f"skipping {f}: outputs exist in {out_dirs[f]} (use --overwrite to replace)")
                skipped += 1
                continue
            problem = existing_outputs_problem(outputs)
            if problem is not None:
                failed.append((str(f), problem))
                continue
        todo.append(f)

    infos = {f: audio_header(f) for f in todo}  # None: a PyAV format or a damaged file runs, or fails, on its own
    # Before separating anything: the outputs' format must hold their channels and rate (FLAC: at most 8, up to
    # 655350 Hz); writing would refuse each file only after its separation.
    unwritable: list[tuple[Path, ValueError]] = []
    for f, info in infos.items():
        if info is None:
            continue
        try:
            check_writable(plan[f][0].suffix[1:], info.channels if args.channels == "each" else 1,
                           output_rate or info.samplerate, args.subtype)
        except ValueError as err:
            unwritable.append((f, err))
    if unwritable:
        raise ValueError(f"{len(unwritable)} of {len(todo)} input(s) cannot be written as asked (e.g. "
                         f"{unwritable[0][0].name}): {unwritable[0][1]}")
    too_short: dict[Path, str] = {}
    if sep.fixed_length is not None:  # an ONNX export of one input length: check every file once, up front
        wrong = {f: problem for f, info in infos.items()
                 if info is not None and (problem := sep.fixed_length_error(info.frames, info.samplerate))}
        # A file shorter than the export fails alone (no setting helps it); other lengths mean chunk settings that
        # do not fit the export, which would fail file after file: refused at once.
        too_short = {f: problem for f, problem in wrong.items()
                     if sep.shorter_than_fixed_length(infos[f].frames, infos[f].samplerate)}
        settings = [f for f in wrong if f not in too_short]
        if settings:
            raise ValueError(f"--chunk-seconds {args.chunk_seconds:g} / --overlap-seconds {args.overlap_seconds:g} do "
                             f"not fit the export: {len(settings)} of {len(todo)} input(s) would run passes of "
                             f"another length (e.g. {settings[0].name}): {wrong[settings[0]]}")

    # Short files share forward passes (sorted by length and zero-padded with true lengths when the model takes
    # them, else only files of identical shape); long files run one at a time, in batched chunks.
    groups: list[list[Path]] = [[f] for f in todo]
    if args.batch_size > 1 and args.stitching == "aligned":
        groups, shapes = [], []
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
            batches = make_batches(sizes, args.batch_size, padded=sep.pads_batches)
            groups.extend([members[i][0] for i in batch] for batch in batches)
        groups.extend([f] for f in singles)

    for f in plot_only:
        try:
            plot_from_outputs(f, plan[f])
            skipped += 1
        except (ValueError, OSError, RuntimeError) as err:
            failed.append((str(f), f"cannot write its spectrogram: {err}"))
    if todo:
        make_folder(args.out_dir, "output folder")
    done, audio_seconds = 0, 0.0
    start_time = time.perf_counter()

    prefix = _rank_prefix(rank, world_size)

    def fail(f: Path, reason: str) -> None:  # said at once in a run of several files (a long batch), and listed
        failed.append((str(f), reason))     # again at the end
        if len(todo) > 1 and not args.quiet:
            tqdm.write(f"{prefix}could not separate {f}: {reason}", file=sys.stderr)

    with tqdm(total=len(todo), desc="files", unit="file", disable=True if not todo else bar_disabled(show_bars)) as bar:
        for group in groups:
            loaded = []
            for f in group:
                try:
                    if f in too_short:
                        raise ValueError(too_short[f])
                    wave, rate = read_audio(f)
                    problem = sep.nothing_to_separate(wave)  # the library would return silent speakers
                    if problem is not None:
                        raise ValueError(problem)
                    loaded.append((f, wave, rate))
                except (ValueError, OSError) as err:
                    fail(f, str(err))
                    bar.update(1)
            if not loaded:
                continue
            rates = {rate for _, _, rate in loaded}
            try:
                if len(loaded) > 1 and len(rates) == 1:
                    with warnings_about(", ".join(str(f) for f, _, _ in loaded)):
                        results = sep.separate_many([w for _, w, _ in loaded], rates.pop(), output_rate)
                else:
                    raise ValueError("not batchable")
            except (ValueError, RuntimeError) as err:
                _raise_if_compile_failed(err, args.compile)
                results = None  # separate one by one so that errors name their file
            for i, (f, wave, rate) in enumerate(loaded):
                try:
                    if results is not None:
                        sources = results[i]
                    else:
                        with warnings_about(str(f)):
                            sources = sep.separate(wave, rate, output_rate)
                    write_separation(plan[f], sources, output_rate or rate, args.subtype,
                                     plot_mixture=(wave, rate) if args.plot else None, title=f.name)
                    done += 1
                    audio_seconds += wave.shape[-1] / rate
                except (ValueError, OSError, RuntimeError) as err:
                    _raise_if_compile_failed(err, args.compile)
                    fail(f, str(err).splitlines()[0] if str(err) else type(err).__name__)
                bar.update(1)
    return _summary(rank, world_size, done, skipped, failed, audio_seconds, time.perf_counter() - start_time)


def _rank_prefix(rank: int, world_size: int) -> str:
    return f"[rank {rank}/{world_size}] " if world_size > 1 else ""


def _summary(rank: int, world_size: int, done: int, skipped: int, failed: list[tuple[str, str]],
             audio_seconds: float, elapsed: float) -> int:
    """Print the run's summary (stdout) and its failures (stderr); the exit status."""
    prefix = _rank_prefix(rank, world_size)
    speed = f" (real-time factor {elapsed / audio_seconds:.3f})" if audio_seconds else ""
    print(f"{prefix}separated {done} file(s), skipped {skipped}, failed {len(failed)}; "
          f"{audio_seconds:.1f} s of audio in {elapsed:.1f} s{speed}")
    for name, reason in failed:
        print(f"{prefix}failed: {name}: {reason}", file=sys.stderr)
    return 1 if failed else 0

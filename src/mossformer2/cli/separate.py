"""``mossformer2 separate``: separate files, folders, globs or lists of recordings into one file per speaker."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mossformer2.cli import (
    add_model_arguments,
    add_refinement_arguments,
    add_separator_arguments,
    chosen_model_config,
    describe_refinements,
    load_chosen_model,
    model_ref,
    refinement_options,
    user_path,
)
from mossformer2.cli.input_files import Inputs, collect_inputs, mirrored_out_dirs, shard_files
from mossformer2.cli.separate_plan import (
    Plan,
    batch_groups,
    check_outputs_writable,
    check_plan,
    output_clashes,
    select_work,
    too_short_for_export,
)

if TYPE_CHECKING:
    import numpy as np

    from mossformer2.separation import Separator

# Also importable from here (tests do); run() reads collect_inputs, shard_files and _load_model through this module's
# globals, so that patching them here takes effect.
__all__ = ["Inputs", "add_parser", "collect_inputs", "mirrored_out_dirs", "run", "shard_files"]

Loaded = list[tuple[Path, "np.ndarray", int]]  # (input, wave [C, T], rate) of the inputs read


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
    parser.add_argument("-o", "--out-dir", required=True, type=user_path, help="output folder")
    add_model_arguments(parser)
    parser.add_argument("--backend", choices=["auto", "torch", "onnxruntime"], default="auto",
                        help="onnxruntime runs an exported .onnx checkpoint without torch's model code")
    add_separator_arguments(parser)
    parser.add_argument("--channels", choices=["mix", "each"], default="mix",
                        help="mix: downmix to mono; each: separate every channel (multichannel outputs; each "
                             "channel's speakers are matched to the first channel's order, their polarity kept "
                             "as recorded, except with --stitching clearvoice)")
    parser.add_argument("--output-rate", default="input",
                        help="'input' (default) or a rate in Hz, 1000 to 768000, e.g. 16000")
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
                             "with --cuda-graphs: faster once compiled, which takes 30-70 s on the first input and "
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


def run(args: argparse.Namespace) -> int:
    import logging

    from mossformer2.audio import audio_header
    from mossformer2.distributed import DistInfo
    from mossformer2.separation import output_paths
    from mossformer2.utils import make_folder

    if args.quiet:  # "only warnings, errors and the summary": not our INFO notes (which weights a file gives, ...)
        logging.getLogger("mossformer2").setLevel(logging.WARNING)
    output_rate = _check_options(args)
    env = DistInfo.from_environment()
    rank, world_size, local_rank = env.rank, env.world_size, env.local_rank
    device = _device(args.device, world_size, local_rank)

    def say(message: str) -> None:  # per-run and per-file notes on stderr, silenced by --quiet
        if not args.quiet:
            print(message, file=sys.stderr)

    # The inputs before the model (seconds for a large checkpoint): a mistyped only input fails at once.
    inputs = collect_inputs(args.inputs, exclude=Path(args.out_dir))
    if inputs.excluded and rank == 0:
        say(f"ignoring {inputs.excluded} file(s) found inside the output folder {args.out_dir}")
    if inputs.beside_inputs and rank == 0:
        say(f"ignoring {inputs.beside_inputs} file(s) named as outputs of an input beside them (like a_s1.wav "
            "beside a.wav): earlier outputs; name them one by one to separate them")
    failed: list[tuple[str, str]] = list(inputs.errors) if rank == 0 else []  # (input, reason); inputs' errors: once
    if not inputs.files:
        if rank == 0 and not failed:
            raise ValueError("nothing to separate: the inputs name no audio file")
        return _summary(rank, world_size, 0, 0, failed, 0.0, 0.0)
    sep = _separator(args, _load_model(args, device), device)
    if any(sep.refinements.values()) and rank == 0:
        say(f"refinements: {describe_refinements(sep)}")

    out_dirs = mirrored_out_dirs(inputs.files, Path(args.out_dir), inputs.roots)
    plan = {f: output_paths(f, out_dirs[f], sep.num_spks, args.format) for f in inputs.files}
    check_plan(inputs.files, plan, args.subtype)
    clashes = output_clashes(inputs.files, plan, args.plot)
    work = select_work(shard_files(inputs.files, rank, world_size), plan, clashes, args.overwrite, args.plot, say)
    failed += work.failed
    infos = {f: audio_header(f) for f in work.todo}  # None: a PyAV format or a damaged file runs, or fails, on its own
    check_outputs_writable(plan, infos, args.channels, output_rate, args.subtype)
    too_short = too_short_for_export(sep, infos, args.chunk_seconds, args.overlap_seconds)
    groups = batch_groups(infos, sep)

    skipped = work.skipped + _plot_from_existing_outputs(work.plot_only, plan, failed)
    if work.todo:
        make_folder(args.out_dir, "output folder")
    start_time = time.perf_counter()
    done, audio_seconds = _separate_groups(groups, sep, plan, too_short, output_rate, args, failed,
                                           _rank_prefix(rank, world_size))
    return _summary(rank, world_size, done, skipped, failed, audio_seconds, time.perf_counter() - start_time)


# -- options, device, model -------------------------------------------------------------------------------------


def _check_options(args: argparse.Namespace) -> int | None:
    """Refuse bad options before any work; the output rate (None: each input's)."""
    from mossformer2.utils import check_folder_creatable

    output_rate = _parse_output_rate(args.output_rate)
    if args.plot:
        from mossformer2.plotting import require_matplotlib

        require_matplotlib()  # before separating anything
    check_folder_creatable(args.out_dir, "output folder")  # created once every option and input is checked
    return output_rate


def _parse_output_rate(value: str) -> int | None:
    if value.lower() == "input":
        return None
    try:
        rate = int(value)
    except ValueError:
        raise ValueError(f"--output-rate must be 'input' or a rate in Hz, got {value!r}") from None
    from mossformer2.audio import check_sample_rate_option

    return check_sample_rate_option(rate, "--output-rate")


def _device(requested: str, world_size: int, local_rank: int) -> str:
    """``--device``, where under torchrun ``auto`` is this process's own GPU (not every rank's first one)."""
    if requested == "auto" and world_size > 1:
        import torch

        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return requested


def _load_model(args: argparse.Namespace, device: str):
    ref = model_ref(args)
    from mossformer2.utils import is_onnx_path

    if args.backend == "onnxruntime" and not is_onnx_path(ref):
        raise ValueError("--backend onnxruntime needs --checkpoint MODEL.onnx (see `mossformer2 export`)")
    config = chosen_model_config(args)
    return load_chosen_model(ref, device, announce=not args.quiet, threads=args.threads, config=config)


def _separator(args: argparse.Namespace, model, device: str) -> Separator:
    from mossformer2.separation import Separator

    return Separator(model, device=device, dtype=args.dtype, chunk_seconds=args.chunk_seconds,
                     overlap_seconds=args.overlap_seconds, stitching=args.stitching, normalize=args.normalize,
                     batch_size=args.batch_size, channels=args.channels,
                     backend=args.backend, progress=_progress_bars(args.quiet), cuda_graphs=args.cuda_graphs,
                     compile_layers=args.compile,
                     **refinement_options(args))


def _progress_bars(quiet: bool) -> bool | None:
    return False if quiet else None  # None: only on a terminal (no \r and cursor codes in logs)


# -- separating and writing -------------------------------------------------------------------------------------


def _plot_from_existing_outputs(inputs: list[Path], plan: Plan, failed: list[tuple[str, str]]) -> int:
    """--plot where only the spectrogram is missing: draw it from the speaker files; how many were written (their
    inputs count as skipped). Failures are added to ``failed``."""
    written = 0
    for f in inputs:
        try:
            plot_from_outputs(f, plan[f])
            written += 1
        except (ValueError, OSError, RuntimeError) as err:
            failed.append((str(f), f"cannot write its spectrogram: {err}"))
    return written


def plot_from_outputs(input_path: Path, outputs: list[Path]) -> Path:
    """Write the spectrogram of an input from its existing speaker files (no separation); returns its path."""
    import numpy as np

    from mossformer2.audio import read_audio
    from mossformer2.separation.outputs import spectrogram_path, write_spectrogram

    wave, rate = read_audio(input_path)
    speakers = [read_audio(p) for p in outputs]
    if len({w.shape for w, _ in speakers}) != 1:
        raise ValueError(f"cannot plot from the existing outputs {outputs[0].name}, ...: their lengths or channel "
                         "counts differ (pass --overwrite to separate again)")
    return write_spectrogram(spectrogram_path(outputs[0]), np.stack([w for w, _ in speakers]), speakers[0][1],
                             wave, rate, title=input_path.name)


def _separate_groups(groups: list[list[Path]], sep: Separator, plan: Plan, too_short: dict[Path, str],
                     output_rate: int | None, args: argparse.Namespace, failed: list[tuple[str, str]],
                     prefix: str) -> tuple[int, float]:
    """Separate each group of inputs (in one batch where it can be) and write their outputs; failures are added to
    ``failed``. The number of inputs separated and their seconds of audio."""
    from tqdm import tqdm

    from mossformer2.separation import write_separation
    from mossformer2.utils import bar_disabled, warnings_about

    count = sum(map(len, groups))

    def fail(f: Path, reason: str) -> None:  # said at once in a run of several files (a long batch), and listed
        failed.append((str(f), reason))     # again at the end
        if count > 1 and not args.quiet:
            tqdm.write(f"{prefix}could not separate {f}: {reason}", file=sys.stderr)

    done, audio_seconds = 0, 0.0
    disable = True if not count else bar_disabled(_progress_bars(args.quiet))
    with tqdm(total=count, desc="files", unit="file", disable=disable) as bar:
        for group in groups:
            loaded, unreadable = _read_inputs(group, sep, too_short)
            for f, reason in unreadable:
                fail(f, reason)
                bar.update(1)
            batch = _separate_batch(loaded, sep, output_rate, args.compile)
            for i in range(len(loaded)):  # (enumerate's cached tuple would keep the last input alive)
                f, wave, rate = loaded[i]
                loaded[i] = (f, None, rate)  # `wave` is then the input's only reference
                seconds, mixture = wave.shape[-1] / rate, (wave, rate) if args.plot else None
                try:
                    if batch is not None:
                        sources = batch[i]
                    else:
                        inputs = [wave]
                        del wave  # freed once at the model rate, unless plotted
                        with warnings_about(str(f)):
                            sources = sep.separate_many(inputs, rate, output_rate, release_inputs=True)[0]
                    write_separation(plan[f], sources, output_rate or rate, args.subtype, plot_mixture=mixture,
                                     title=f.name)
                    done += 1
                    audio_seconds += seconds
                except (ValueError, OSError, RuntimeError) as err:
                    _raise_if_compile_failed(err, args.compile)
                    fail(f, str(err).splitlines()[0] if str(err) else type(err).__name__)
                bar.update(1)
    return done, audio_seconds


def _read_inputs(files: list[Path], sep: Separator,
                 too_short: dict[Path, str]) -> tuple[Loaded, list[tuple[Path, str]]]:
    """``(input, wave, rate)`` of the inputs that can be separated, and ``(input, reason)`` of the others."""
    from mossformer2.audio import read_audio

    loaded, unreadable = [], []
    for f in files:
        if f in too_short:
            unreadable.append((f, too_short[f]))
            continue
        try:
            wave, rate = read_audio(f)
            problem = sep.nothing_to_separate(wave)  # the library would return silent speakers
        except (ValueError, OSError) as err:
            problem = str(err)
        if problem is None:
            loaded.append((f, wave, rate))
        else:
            unreadable.append((f, problem))
    return loaded, unreadable


def _separate_batch(loaded: Loaded, sep: Separator, output_rate: int | None,
                    compiling: bool) -> list[np.ndarray] | None:
    """The inputs' separations from one batched call, or None where they are to be separated one by one: a single
    input, several rates, or a batch that failed (one by one, an error names its file)."""
    from mossformer2.utils import warnings_about

    rates = {rate for _, _, rate in loaded}
    if len(loaded) < 2 or len(rates) != 1:
        return None
    try:
        with warnings_about(", ".join(str(f) for f, _, _ in loaded)):
            return sep.separate_many([wave for _, wave, _ in loaded], rates.pop(), output_rate)
    except (ValueError, RuntimeError) as err:
        _raise_if_compile_failed(err, compiling)
        return None


def _raise_if_compile_failed(err: BaseException, compiling: bool) -> None:
    """With --compile, an error of torch.compile itself (no C++ compiler, Triton missing, a compiler bug) would
    fail every file the same way: end the run with one message instead of one per file."""
    if compiling and type(err).__module__.startswith(("torch._dynamo", "torch._inductor")):
        cause = getattr(err, "inner_exception", None) or err  # BackendCompilerFailed wraps the compiler's error
        text = str(cause).strip()
        reason = f"{type(cause).__name__}: {text.splitlines()[0]}" if text else type(cause).__name__
        raise ValueError(f"compiling the network failed (--compile): {reason}; run without --compile") from err


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

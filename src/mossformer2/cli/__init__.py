"""The ``mossformer2`` command. Each subcommand lives in its own module with ``add_parser`` and ``run``.

Subcommand modules import heavy dependencies inside ``run`` so that ``mossformer2 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

from mossformer2.distributed import DistInfo

if TYPE_CHECKING:
    from mossformer2.models.config import MossFormer2Config

SUBCOMMANDS = ["separate", "demo", "info", "train", "evaluate", "mix", "export"]
PIP_NAMES = {"yaml": "pyyaml"}  # import name -> the name pip installs it by, where they differ


def build_parser() -> argparse.ArgumentParser:
    from mossformer2 import __version__

    parser = argparse.ArgumentParser(
        prog="mossformer2",
        description="Monaural speech separation with MossFormer2.",
    )
    parser.add_argument("--version", action="version", version=f"mossformer2 {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"mossformer2.cli.{name}")
        except ModuleNotFoundError as err:
            # Only a missing subcommand module itself is tolerated (tests assert all are present).
            if err.name != f"mossformer2.cli.{name}":
                raise
            continue
        sub_parser = module.add_parser(sub)
        sub_parser.set_defaults(_run=module.run)
    return parser


def user_path(text: str) -> str:
    """argparse ``type`` of path options: ``~`` expanded as for the inputs (a shell leaves ``--out-dir=~/x`` as
    it is, which made a folder named ``~``)."""
    return os.path.expanduser(text)


REFINEMENT_HELP = {
    "polarity_ensemble": "also separate the negated input and average both estimates (twice the compute)",
    "wiener_filter": "re-estimate the sources as soft masks on the input's spectrogram (Wiener filter)",
    "mixture_consistency": "make the separated sources sum to the input",
}


def add_refinement_arguments(parser: argparse.ArgumentParser) -> None:
    """``--[no-]polarity-ensemble``, ``--[no-]wiener-filter``, ``--[no-]mixture-consistency``; ``None`` (neither
    form given): as the checkpoint recommends (``Separator``)."""
    for name, text in REFINEMENT_HELP.items():
        parser.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=None,
                            help=f"{text}; default: as the checkpoint recommends")


def chunk_seconds(text: str) -> float | None:
    """``--chunk-seconds``: seconds, or "none" for one pass per input."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or none, got {text!r}") from None


def add_separator_arguments(parser: argparse.ArgumentParser, whole_inputs: bool = False) -> None:
    """The ``Separator`` options ``separate`` and ``evaluate`` share: device, precision, chunking, level.
    ``whole_inputs``: no chunking unless ``--chunk-seconds`` is given (test sets: one pass per mixture)."""
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads to compute with (default: all cores, or OMP_NUM_THREADS where set; on a "
                             "shared machine keep it at or below the idle cores)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="autocast precision, torch backend (default float32; float16 needs CUDA)")
    if whole_inputs:
        parser.add_argument("--chunk-seconds", type=chunk_seconds, default=None,
                            help="separate mixtures longer than this in overlapping chunks, as `separate` does "
                                 "(default none: each mixture in one pass, the standard protocol of test sets and "
                                 "the trainer's validation)")
    else:
        parser.add_argument("--chunk-seconds", type=chunk_seconds, default=10.0,
                            help="chunk length for long inputs (10); none: each file in one pass, however long "
                                 "(no speaker swaps between chunks; memory grows with the length)")
    parser.add_argument("--overlap-seconds", type=float, default=2.0,
                        help="overlap between chunks, where their speakers are matched: > 0 for aligned stitching; "
                             "under 1 s (or with short chunks) speakers may swap between chunks (2)")
    parser.add_argument("--stitching", choices=["aligned", "clearvoice"], default="aligned",
                        help="aligned (default): speaker alignment + cross-fade; clearvoice: the official tool's "
                             "windows (as there, up to the last 0.25 s may come out silent)")
    parser.add_argument("--normalize", choices=["rms", "peak", "none", "clearvoice"], default="rms",
                        help="input level the model sees (default rms: -25 dBFS; outputs restored to the input "
                             "level, except clearvoice)")


def refinement_options(args: argparse.Namespace) -> dict[str, bool | None]:
    """The ``Separator`` keyword arguments of ``add_refinement_arguments``' options."""
    return {name: getattr(args, name) for name in REFINEMENT_HELP}


def model_ref(args: argparse.Namespace) -> str | None:
    """The model a ``--checkpoint PATH`` / ``--model NAME`` pair names: a path, or ``None`` for the built-in model."""
    from mossformer2.hub import model_name_to_ref

    return model_name_to_ref(args.model) if args.model is not None else args.checkpoint


def announce_builtin_model(alternatives: str = "--checkpoint PATH or --model NAME") -> None:
    """Say on stderr that the built-in model runs, and how to pick another."""
    from mossformer2.pretrained import DEFAULT_MODEL_NAME

    print(f"using the built-in model {DEFAULT_MODEL_NAME} (pass {alternatives} for another)", file=sys.stderr)


CHECKPOINT_HELP = "checkpoint file or folder, hub id (OWNER/NAME), or an export (.onnx or TorchScript)"
MODEL_HELP = "named model: 'default' (built in) or MossFormer2_SS_16K / a hub id"


def add_model_arguments(parser: argparse.ArgumentParser, checkpoint_help: str = CHECKPOINT_HELP,
                        model_help: str = MODEL_HELP, model_config: bool = True) -> None:
    """The model a command runs: ``--checkpoint PATH`` or ``--model NAME`` (read back by :func:`model_ref`), and
    ``--model-config`` (read back by :func:`chosen_model_config`) unless ``model_config=False``."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, help=checkpoint_help)
    source.add_argument("--model", default=None, help=model_help)
    if model_config:
        parser.add_argument("--model-config", default=None, metavar="YAML_OR_NAME",
                            help="architecture of a --checkpoint that stores none (a bare state dict whose sample "
                                 "rate, group size or rotary size is not the official one: its tensor shapes cannot "
                                 "tell): a YAML file of MossFormer2Config fields (top level or a training config's "
                                 "model: section) or MossFormer2 / MossFormer2-S; overrides a stored config, with a "
                                 "warning")


def chosen_model_config(args: argparse.Namespace) -> MossFormer2Config | None:
    """``--model-config``, read before any model loads (a bad file fails at once); refused without
    ``--checkpoint`` (the built-in and named models store their own) and for an export."""
    if args.model_config is None:
        return None
    if args.checkpoint is None:
        raise ValueError("--model-config gives a --checkpoint its architecture; the built-in model and --model NAME "
                         "store their own")
    from mossformer2.config_utils import read_model_config
    from mossformer2.separation.loading import refuse_config_for_export
    from mossformer2.utils import is_onnx_path

    if is_onnx_path(args.checkpoint):
        refuse_config_for_export(args.checkpoint, args.model_config)
    return read_model_config(args.model_config)


def load_chosen_model(ref: str | None, device: str, announce: bool = True, threads: int | None = None,
                      config: MossFormer2Config | None = None):
    """``load_separation_model(ref, device, config=...)``, saying so on stderr when ``ref`` is ``None`` (the
    built-in model) and ``announce``; ``threads``: the CPU threads it computes with (``--threads``; default: as
    torch and ONNX Runtime choose, ``OMP_NUM_THREADS`` where it is set); ``config``: :func:`chosen_model_config`."""
    from mossformer2.separation import load_separation_model

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if threads > 16 * cores:  # 10^5 threads failed every file; 10^6 crashed (thread stacks exhaust memory)
            raise ValueError(f"--threads {threads}: this process may use {cores} CPU core(s); at most "
                             f"{16 * cores} threads are taken (and more than {cores} only slow it down)")
        if threads > cores:  # spinning OpenMP threads on shared cores: 75x slower, measured
            warnings.warn(f"--threads {threads} is more than the {cores} CPU core(s) this process may use: "
                          "oversubscribed threads run many times slower", stacklevel=2)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # ONNX Runtime's session reads it when it starts
    if ref is None and announce:
        announce_builtin_model()
    model = load_separation_model(ref, device, config=config)
    if threads is not None and "torch" in sys.modules:  # (an ONNX model runs without importing torch)
        sys.modules["torch"].set_num_threads(threads)
    return model


def describe_refinements(separator) -> str:
    """``"polarity ensemble + wiener filter"``, ``"none"``, ...: what a ``Separator`` applies."""
    return " + ".join(name.replace("_", " ") for name, on in separator.refinements.items() if on) or "none"


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Show warnings as ``mossformer2 CMD: warning: ...`` (not source path, line and code) while a command runs,
    through ``tqdm.write``: printed while a progress bar is active, they would land on the bar's line."""
    from tqdm import tqdm

    def show(message, *_args, **_kwargs) -> None:
        tqdm.write(f"mossformer2 {command}: warning: {message}", file=sys.stderr)

    original = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


ONNX_COMMANDS = {"separate", "evaluate", "info"}  # they run an exported model without torch: --checkpoint X.onnx


def _is_missing_torch(err: ImportError) -> bool:
    """Whether ``err`` is torch (or one of its modules) failing to import: not installed in this environment."""
    return (err.name or "").split(".")[0] == "torch"


def _torch_missing(args: argparse.Namespace) -> str:
    """What to do when a command needed torch and it is not installed."""
    from mossformer2.utils import is_onnx_path

    if args.command in ONNX_COMMANDS and not is_onnx_path(getattr(args, "checkpoint", None)):
        return ("PyTorch is not installed: the built-in model and .pt checkpoints need it; pass --checkpoint "
                "MODEL.onnx (README, \"Export and deployment\")")
    return f"PyTorch is not installed, and `mossformer2 {args.command}` needs it here: pip install torch"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse fills a nargs="*" positional from one run of arguments only, so `train ... a=1 --exp-dir D b=2`
        # leaves b=2 over: key=value overrides may sit on both sides of an option, in their given order.
        if getattr(args, "command", None) == "train" and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # Our own INFO messages (training progress) show; other libraries' only from WARNING on (the ONNX exporter
    # alone logs hundreds of INFO lines), unless --verbose.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mossformer2").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # huggingface_hub prints through a handler of its own: passed on to ours too, each retry would show twice.
    logging.getLogger("huggingface_hub").propagate = False
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        with contextlib.nullcontext() if args.verbose else _one_line_warnings(args.command):
            return int(args._run(args) or 0)
    except KeyboardInterrupt:
        if DistInfo.from_environment(strict=False).is_main:  # under torchrun: once, not once per process
            print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`mossformer2 info | head`): stop quietly, as other command-line tools do. Point
        # stdout at /dev/null so that the interpreter's final flush does not fail again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the shell's code for a command ended by a closed pipe
    except ModuleNotFoundError as err:
        if _is_missing_torch(err) and not args.verbose:  # an ONNX-only deployment (README, "Export and deployment")
            print(f"mossformer2 {args.command}: error: {_torch_missing(args)}", file=sys.stderr)
            return 1
        # An optional package a command needs (pesq, pystoi, onnx, onnxruntime, ...): one line, no traceback.
        package = (err.name or "").split(".")[0]
        if args.verbose or package == "mossformer2":  # our own modules are not optional: a bug, show it
            raise
        distribution = PIP_NAMES.get(package, package)  # the import name is not always the one pip installs
        hint = f"; install it with `pip install {distribution}`" if package and "pip install" not in str(err) else ""
        print(f"mossformer2 {args.command}: error: {err}{hint}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, OSError) as err:
        # User errors (bad file, bad option value): one clear line, no traceback.
        if args.verbose:
            raise
        print(f"mossformer2 {args.command}: error: {err}", file=sys.stderr)
        return 1


def entry_point() -> None:
    """The ``mossformer2`` command: tune the CPU allocator for large tensors, then run ``main``."""
    from mossformer2.utils import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry_point()

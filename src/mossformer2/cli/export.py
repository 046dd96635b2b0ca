"""``mossformer2 export``: write a checkpoint as an ONNX or TorchScript file and check it against PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

from mossformer2.cli import add_model_arguments, chosen_model_config, model_ref, user_path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export", help="export a model to ONNX or TorchScript",
        description="Export a checkpoint to ONNX (run it with ONNX Runtime, e.g. `mossformer2 separate "
                    "--checkpoint model.onnx --backend onnxruntime`) or TorchScript. The export is run once "
                    "beside PyTorch and the max abs difference printed before it is moved into place: one that "
                    "differs by more than --tolerance is never written.")
    add_model_arguments(parser, "checkpoint file or folder, or hub id (default: the model shipped with the package)")
    parser.add_argument("--format", choices=["onnx", "torchscript"], required=True, help="export format")
    parser.add_argument("-o", "--output", required=True, type=user_path, help="output file (.onnx / .ts.pt)")
    parser.add_argument("--dynamic-length", action=argparse.BooleanOptionalAction, default=None,
                        help="ONNX: symbolic batch and time axes, any input length (default); "
                             "--no-dynamic-length fixes the shape to --length-seconds at batch 1")
    parser.add_argument("--length-seconds", type=float, default=4.0,
                        help="length of the tracing example; the fixed input length with --no-dynamic-length "
                             "(default 4.0)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX: opset version (default 18)")
    parser.add_argument("--method", choices=["trace", "script"], default=None,
                        help="TorchScript: trace (default) or script")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="fail (exit 1) if the export differs from PyTorch by more than this "
                             "(max abs; default 1e-3)")
    return parser


MAX_EXAMPLE_SECONDS = 600

# Options that apply to one format only: given with the other, they would be ignored without a word.
FORMAT_OPTIONS = {"onnx": {"dynamic_length": "--[no-]dynamic-length", "opset": "--opset"},
                  "torchscript": {"method": "--method"}}


def check_format_options(args: argparse.Namespace) -> None:
    for fmt, options in FORMAT_OPTIONS.items():
        given = [flag for name, flag in options.items() if getattr(args, name) is not None]
        if given and args.format != fmt:
            raise ValueError(f"{', '.join(given)} only applies to --format {fmt}, not --format {args.format}")


def run(args: argparse.Namespace) -> int:
    from mossformer2.checkpoint import is_torchscript_archive
    from mossformer2.export import (
        DEFAULT_OPSET,
        check_export_name,
        check_opset,
        example_input,
        example_length,
        export_onnx,
        export_torchscript,
        verify_export,
    )
    from mossformer2.hub import checkpoint_path
    from mossformer2.runtime import import_optional
    from mossformer2.separation.loading import load_separation_model
    from mossformer2.utils import TORCHSCRIPT_SUFFIX, atomic_path, is_onnx_path, make_folder

    check_format_options(args)
    if not 0 < args.length_seconds <= MAX_EXAMPLE_SECONDS:  # (1e6 s was an out-of-memory traceback)
        raise ValueError(f"--length-seconds must be a positive number of seconds up to {MAX_EXAMPLE_SECONDS} (the "
                         f"example only fixes the shape; a dynamic export takes any length), got {args.length_seconds}")
    if not args.tolerance >= 0:  # no export passes a negative one: refused before the export, not after
        raise ValueError(f"--tolerance must be >= 0, got {args.tolerance:g}")
    checkpoint = model_ref(args)
    if is_onnx_path(checkpoint):
        raise ValueError("--checkpoint is already an exported ONNX model; export needs a PyTorch checkpoint")
    output = Path(args.output)
    if output.is_dir():
        raise ValueError(f"-o {output} is a folder: give the file to write, e.g. {output / 'model'}"
                         f"{'.onnx' if args.format == 'onnx' else TORCHSCRIPT_SUFFIX}")
    check_export_name(output, args.format)  # before the checkpoint loads
    make_folder(output.parent, "output folder")  # a bad -o fails before the checkpoint loads
    if args.format == "onnx":
        import_optional("onnxruntime", "checking the ONNX export")  # before the export, not after it
        check_opset(args.opset or DEFAULT_OPSET)
    if checkpoint is None:
        print("no --checkpoint given: exporting the model shipped with the package")
    path = None if checkpoint is None else checkpoint_path(checkpoint)  # (a hub id resolved once)
    if path is not None and is_torchscript_archive(path):  # refused before it would run
        raise ValueError(f"--checkpoint {checkpoint} is already a TorchScript export; export needs the "
                         "PyTorch checkpoint it was exported from")
    config = chosen_model_config(args)
    model = load_separation_model(path, device="cpu", config=config)
    fixed_samples = example_length(model, args.length_seconds)
    if args.format == "onnx" and args.dynamic_length is False and fixed_samples < model.min_input_length:
        raise ValueError(f"--length-seconds {args.length_seconds:g} is {fixed_samples} samples at "
                         f"{model.config.sample_rate} Hz, under the model's shortest input ({model.min_input_length} "
                         "samples): the fixed input length would not be the one asked for")
    # Export to a temp file, check it, and only then move it onto the output: a bad export never lands.
    # (the temp file keeps the whole .ts.pt ending: export_torchscript checks the name it writes to)
    with atomic_path(output, TORCHSCRIPT_SUFFIX if args.format == "torchscript" else None) as tmp:
        example = example_input(model, seconds=args.length_seconds, batch_size=1)  # (a dynamic ONNX export
        if args.format == "onnx":                                                   # repeats it to batch 2)
            export_onnx(model, tmp, dynamic_length=args.dynamic_length is not False,
                        opset=args.opset or DEFAULT_OPSET, example=example)
        else:
            export_torchscript(model, tmp, method=args.method or "trace", example=example)
        error = verify_export(model, tmp, args.format)
        print(f"max abs difference to PyTorch: {error:.3g}")
        if not error <= args.tolerance:
            raise ValueError(f"the export differs from PyTorch by {error:.3g} > --tolerance {args.tolerance:g}; "
                             f"{output} was not written")
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
    return 0

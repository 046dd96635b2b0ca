"""``mossformer2 evaluate``: separate a test set and score it (SI-SDR(i), SDR(i), PESQ, STOI)."""

from __future__ import annotations

import argparse

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


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate", help="score a checkpoint on a test set (SI-SDRi, SDRi, PESQ, STOI)",
        description="Separate every mixture of --data (a wsj0-2mix folder mix/ s1/ s2/, a LibriMix / WHAM! "
                    "mixture folder such as <split>/mix_clean, a LibriMix metadata CSV, or a 'mix s1 s2' list / "
                    ".scp), align the outputs to the references by PIT and score "
                    "them. Writes OUT/per_utterance.csv (one row per mixture, written as it goes; re-running "
                    "skips the mixtures already scored) and OUT/summary.json (mean, median, std, count per "
                    "metric, failures with reasons), and prints a table. Exit code 1 if any mixture failed. SI-SDR is "
                    "the zero-mean definition of the official recipe (estimate and reference have their means "
                    "removed); PESQ is narrow band (P.862) at 8 kHz, wide band (P.862.2) otherwise. A re-run "
                    "with other settings or other weights (the checkpoint's SHA-256 is recorded) is refused.")
    parser.add_argument("--data", required=True, type=user_path,
                        help="wsj0-2mix folder (mix/ s1/ s2/), LibriMix / WHAM! mixture folder (<split>/mix_clean "
                             "or mix_both), LibriMix CSV, or list/scp file")
    add_model_arguments(parser)
    parser.add_argument("-o", "--out", required=True, type=user_path,
                        help="output folder for per_utterance.csv, summary.json")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated subset of si_sdr,sdr,pesq,stoi (default: every one whose package is "
                             "installed; PESQ and STOI need mossformer2[quality])")
    parser.add_argument("--score-rate", type=int, default=None,
                        help="resample estimates, references and mixture to this rate before scoring (e.g. "
                             "8000 to compare with published 8 kHz numbers; default: the data's rate)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N mixtures")
    add_separator_arguments(parser, whole_inputs=True)
    add_refinement_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="discard earlier results in OUT and start again")
    return parser


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from mossformer2.audio import check_sample_rate_option
    from mossformer2.data.manifests import load_manifest
    from mossformer2.evaluation.evaluate import WEIGHTS_KEY, evaluate, file_sha256, format_table
    from mossformer2.hub import checkpoint_path
    from mossformer2.metrics import METRICS, installed_metrics, missing_package, missing_package_advice, parse_metrics
    from mossformer2.pretrained import default_model_path
    from mossformer2.separation import Separator
    from mossformer2.utils import check_folder_creatable, dtype_name, is_onnx_path

    # Every metric that can be scored here by default (a word on the others once the options are checked).
    metrics = installed_metrics() if args.metrics is None else parse_metrics(args.metrics)  # a typo fails first
    if args.score_rate is not None:
        check_sample_rate_option(args.score_rate, "--score-rate")
    if not Path(args.data).exists():
        raise FileNotFoundError(f"--data not found: {args.data}")
    load_manifest(args.data)  # and on a bad manifest (missing files, ...) before loading a large model
    check_folder_creatable(args.out, "output folder")  # and on a bad --out (evaluate() creates it)
    if args.metrics is None:
        for name in [m for m in METRICS if m not in metrics]:
            print(f"leaving out {name}: {missing_package_advice(name, missing_package(name))}", file=sys.stderr)
    ref = model_ref(args)
    # Resolved once (a hub id: its cached snapshot file), so that the weights hashed are the weights loaded.
    weights = ref if ref is None or is_onnx_path(ref) else str(checkpoint_path(ref).absolute())
    if weights is not None and not Path(ref).is_file():  # a folder (a run's best.pt, or its only file) or a hub id
        print(f"checkpoint file: {weights}", file=sys.stderr)
    model = load_chosen_model(weights, args.device, threads=args.threads, config=chosen_model_config(args))
    separator = Separator(model, device=args.device, dtype=args.dtype, chunk_seconds=args.chunk_seconds,
                          overlap_seconds=args.overlap_seconds, stitching=args.stitching,
                          normalize=args.normalize, **refinement_options(args))
    print(f"refinements: {describe_refinements(separator)}", file=sys.stderr)
    checkpoint = "built-in" if ref is None else str(Path(ref).resolve()) if Path(ref).exists() else str(ref)
    info = {"checkpoint": checkpoint, "checkpoint_file": weights or "built-in",
            WEIGHTS_KEY: file_sha256(default_model_path() if weights is None else weights),
            "device": str(separator.device), "dtype": dtype_name(separator.dtype),  # float16 may fall back
            "separator": {"chunk_seconds": separator.chunk_seconds, "overlap_seconds": separator.overlap_seconds,
                          "stitching": args.stitching, "normalize": args.normalize, **separator.refinements}}
    if args.model_config is not None:  # the weights are the same file, the network another: a re-run must match
        info["model_config"] = model.config.to_dict()
    summary = evaluate(separator, args.data, args.out, metrics=metrics, score_rate=args.score_rate,
                       limit=args.limit, overwrite=args.overwrite, info=info, progress=None)  # terminal only
    print(format_table(summary))
    print(f"results: {Path(args.out) / 'per_utterance.csv'}, {Path(args.out) / 'summary.json'}")
    if summary["num_csv_rows_not_summarised"]:
        print(f"(per_utterance.csv also holds {summary['num_csv_rows_not_summarised']} mixture(s) an earlier run "
              "scored beyond this run's --limit; the summary covers this run's mixtures)")
    return 1 if summary["num_failed"] else 0

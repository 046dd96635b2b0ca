"""``mossformer2 mix``: create test mixtures in the wsj0-2mix layout (``mix/ s1/ s2/ ...`` + metadata.csv)."""

from __future__ import annotations

import argparse

from mossformer2.cli import user_path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "mix", help="create speech mixtures (wsj0-2mix layout) for evaluation",
        description="Create N-speaker mixtures in OUT_DIR/mix, OUT_DIR/s1, OUT_DIR/s2, ... with a LibriMix-style "
                    "OUT_DIR/metadata.csv. Three ways: (a) INPUT is two or more audio files, mixed at --sir; "
                    "(b) INPUT is one folder ROOT/<speaker>/*.wav of single-speaker recordings, "
                    "--num-mixtures random mixtures of different speakers at SIRs drawn from --sir-range; "
                    "(c) --recipe FILE, a wsj0-2mix mixing list ('s1_path snr1 s2_path snr2' per line, paths "
                    "under --wsj-root). Each source is normalised to unit ITU-T P.56 active level and scaled "
                    "by its dB value; if anything would peak above 0.9, mixture and sources are rescaled "
                    "together (as in the wsj0-2mix scripts), which keeps mix = s1 + s2 and the SIR.")
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="two or more audio files, or one folder of speaker folders")
    parser.add_argument("-o", "--out-dir", required=True, type=user_path, help="output folder")
    parser.add_argument("--recipe", type=user_path, help="wsj0-2mix-style mixing list (mix_2_spk_tt.txt format)")
    parser.add_argument("--wsj-root", type=user_path, help="folder the recipe's paths are relative to")
    # Mode-specific options default to None, so that one given in another mode is refused instead of ignored.
    parser.add_argument("--sir", type=float, default=None,
                        help="files mode: level of s1 over each other source in dB (default 0)")
    parser.add_argument("--num-mixtures", type=int, default=None,
                        help="folder mode (required there): how many mixtures")
    parser.add_argument("--num-spks", type=int, default=None, help="folder mode: speakers per mixture (2)")
    parser.add_argument("--sir-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="folder mode: SIR of s1 over the others, uniform in dB (default -5 5)")
    parser.add_argument("--seed", type=int, default=None,
                        help="folder mode: random seed (default 0; same seed, same bytes)")
    parser.add_argument("--mode", choices=["min", "max"], default="min",
                        help="min: cut to the shortest source; max: zero-pad to the longest (default min)")
    parser.add_argument("--sample-rate", type=int, default=16000,
                        help="output rate in Hz (default 16000, the built-in and official models' rate); sources "
                             "at other rates are resampled, and the command says so")
    parser.add_argument("--subtype", choices=["PCM_16", "PCM_24", "FLOAT"], default="PCM_16",
                        help="sample format of the written wavs (default PCM_16, as wsj0-2mix)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the set already in OUT_DIR (or the files a killed run left there); other "
                             "audio files in its mix/ s1/ ... folders make the run refuse")
    return parser


FOLDER_OPTIONS = {"num_mixtures": "--num-mixtures", "num_spks": "--num-spks", "sir_range": "--sir-range",
                  "seed": "--seed"}


def _refuse_options(args: argparse.Namespace, names: dict[str, str], mode: str) -> None:
    given = [flag for name, flag in names.items() if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: not used in {mode}")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from mossformer2.audio import audio_header, check_sample_rate_option
    from mossformer2.evaluation.mixing import (
        create_mixtures,
        plan_from_files,
        plan_from_recipe,
        plan_from_speaker_folder,
    )

    check_sample_rate_option(args.sample_rate, "--sample-rate")  # as `separate` refuses: files it would refuse
    if args.recipe:
        if args.inputs:
            raise ValueError("give either INPUT files/folder or --recipe, not both")
        if not args.wsj_root:
            raise ValueError("--recipe needs --wsj-root, the folder its paths are relative to")
        _refuse_options(args, {**FOLDER_OPTIONS, "sir": "--sir"}, "recipe mode (the recipe sets the levels)")
        specs = plan_from_recipe(args.recipe, args.wsj_root)
    elif len(args.inputs) == 1:
        root = Path(args.inputs[0])
        if not root.exists():
            raise FileNotFoundError(f"no such file or folder: {root}")
        if not root.is_dir():
            raise ValueError(f"{root} is one file: give two or more audio files, or one folder of speaker folders "
                             "(ROOT/<speaker>/*.wav)")
        if args.num_mixtures is None:
            raise ValueError("a speaker folder needs --num-mixtures N")
        _refuse_options(args, {"sir": "--sir"}, "folder mode (use --sir-range)")
        out, inside = Path(args.out_dir).resolve(), root.resolve()
        below = out.relative_to(inside).parts if out == inside or inside in out.parents else None
        if below is not None and not any(part.startswith(".") for part in below):  # hidden folders are skipped
            raise ValueError(f"--out-dir {args.out_dir} lies inside the speaker folder {root}: its mixtures would "
                             "be read as speakers' recordings next time; write them elsewhere")
        specs = plan_from_speaker_folder(root, args.num_mixtures, 2 if args.num_spks is None else args.num_spks,
                                         (-5.0, 5.0) if args.sir_range is None else tuple(args.sir_range),
                                         0 if args.seed is None else args.seed)
    elif len(args.inputs) >= 2:
        folders = [name for name in args.inputs if Path(name).is_dir()]
        if folders:
            raise ValueError(f"{folders[0]} is a folder: give two or more audio files, or one folder of speaker "
                             "folders (ROOT/<speaker>/*.wav), not both")
        _refuse_options(args, FOLDER_OPTIONS, "files mode (one mixture of the given files, at --sir)")
        specs = plan_from_files(args.inputs, 0.0 if args.sir is None else args.sir)
    else:
        raise ValueError("give two or more audio files, one folder of speaker folders (ROOT/<speaker>/*.wav), "
                         "or --recipe FILE --wsj-root DIR")
    metadata = create_mixtures(specs, args.out_dir, sample_rate=args.sample_rate, mode=args.mode,
                               subtype=args.subtype, overwrite=args.overwrite, progress=None)  # terminal only
    headers = [audio_header(f) for f in {f for spec in specs for f in spec.files}]  # None: not libsndfile's
    rates = sorted({int(h.samplerate) for h in headers if h is not None} - {args.sample_rate})
    if rates:
        print(f"sources at {', '.join(map(str, rates))} Hz were resampled to {args.sample_rate} Hz (--sample-rate)",
              file=sys.stderr)
    print(f"wrote {len(specs)} mixture(s) of {len(specs[0].files)} speakers to {Path(args.out_dir)} "
          f"(metadata: {metadata})")
    return 0

"""``mossformer2 demo``: mix two shipped clips, separate them with the built-in model, report SI-SDRi."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mossformer2.cli import (
    add_model_arguments,
    add_refinement_arguments,
    announce_builtin_model,
    describe_refinements,
    model_ref,
    refinement_options,
    user_path,
)

DEMO_DIR = Path(__file__).resolve().parents[1] / "pretrained" / "demo"
DEMO_CLIPS = ("speaker_ro.flac", "speaker_es.flac")
PAIRING = "speakerN.wav is the estimate of referenceN.wav (network output i is reference permutation[i])"
OUTPUT_NAMES = ("mixture.wav", "speaker1.wav", "speaker2.wav", "reference1.wav", "reference2.wav", "spectrogram.png",
                "scores.json")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="separate a two-speaker demo mixture built from clips shipped with the package",
        description="Build a two-speaker mixture from two clips shipped with the package, separate it with the "
                    "built-in model (or --checkpoint), write the audio and a spectrogram, and print SI-SDRi.")
    parser.add_argument("-o", "--out-dir", default="mossformer2_demo", type=user_path,
                        help="output folder (default: %(default)s)")
    parser.add_argument("--sir", type=float, default=0.0, help="level of speaker 1 over speaker 2 in dB (default 0)")
    add_model_arguments(parser, "use this checkpoint (file or folder, hub id, or an export) instead of the built-in "
                                "model", model_config=False)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files of these names that an earlier demo run did not write (a folder "
                             "holding an earlier demo's output is reused without it)")
    add_refinement_arguments(parser)
    return parser


def check_demo_folder(out_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse to write over files of the demo's names that an earlier demo run did not write (its scores.json
    names the pairing), unless ``overwrite``."""
    out = Path(out_dir)
    existing = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if not existing or overwrite:
        return
    try:
        from_demo = json.loads((out / "scores.json").read_text(encoding="utf-8")).get("files") == PAIRING
    except (OSError, ValueError, AttributeError):
        from_demo = False
    if not from_demo:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}, which no demo run wrote: pass --overwrite "
                              "to replace them, or choose another -o")


def run_demo(out_dir: str | Path, sir_db: float = 0.0, checkpoint: str | None = None,
             device: str = "auto", overwrite: bool = False, **refinements: bool | None) -> dict:
    """Mix, separate, write ``mixture.wav``, ``speaker1.wav``, ``speaker2.wav``, ``reference1.wav``, ``reference2.wav``,
    ``spectrogram.png`` and ``scores.json`` into ``out_dir``; return the scores (see
    ``mossformer2.metrics.score_separation``). The estimates are written in reference order (``speakerN.wav``
    is the estimate of ``referenceN.wav``); ``permutation[i]`` says which reference the network's output i is.
    ``refinements``: ``Separator`` switches (``polarity_ensemble=False``, ...; default: the model's).
    ``overwrite``: see :func:`check_demo_folder` (checked before any work)."""
    import numpy as np

    from mossformer2.audio import read_audio, resample, to_mono, write_audio
    from mossformer2.evaluation.mixing import check_sir, levels_for_sirs, mix_waves
    from mossformer2.metrics import score_separation
    from mossformer2.plotting import plot_separation, require_matplotlib
    from mossformer2.separation import Separator
    from mossformer2.separation.outputs import write_separation
    from mossformer2.utils import atomic_write_text, make_folder

    require_matplotlib()  # the spectrogram comes last: refused before the work, not after the audio is written

    check_sir(sir_db, "the SIR (--sir)")
    check_demo_folder(out_dir, overwrite)
    separator = Separator.from_pretrained(checkpoint, device=device, **refinements)
    if separator.num_spks != len(DEMO_CLIPS):
        raise ValueError(f"the demo mixes {len(DEMO_CLIPS)} speakers; this model separates {separator.num_spks}")
    rate = separator.model.config.sample_rate
    clips = []
    for name in DEMO_CLIPS:
        wave, sr = read_audio(DEMO_DIR / name)
        clips.append(resample(to_mono(wave), sr, rate))
    mix, refs, _, _ = mix_waves(clips, levels_for_sirs([sir_db]), rate, mode="min")
    mix, refs = mix.astype("float32"), refs.astype("float32")
    est = separator.separate(mix, rate)  # [S, T]
    scores = score_separation(est, refs, mix, rate, metrics=("si_sdr",))
    scores["refinements"] = describe_refinements(separator)
    scores["files"] = PAIRING
    # aligned[k]: the output matched to reference k (the order score_separation scored them in)
    aligned = est[np.argsort(scores["permutation"])]

    out = make_folder(out_dir, "output folder")
    # scores.json first: it marks the folder as a demo's, so a rerun after an interrupted one may replace the rest
    atomic_write_text(out / "scores.json", json.dumps({"sir_db": sir_db, **scores}, indent=2) + "\n")
    write_audio(out / "mixture.wav", mix, rate)
    write_separation([out / f"speaker{k + 1}.wav" for k in range(len(aligned))], aligned, rate)
    for k, ref in enumerate(refs):
        write_audio(out / f"reference{k + 1}.wav", ref, rate)
    plot_separation(mix, aligned, rate, out / "spectrogram.png",
                    title=f"mossformer2 demo: SI-SDRi {scores['si_sdri']:.1f} dB")
    return scores


def run(args: argparse.Namespace) -> int:
    from mossformer2.utils import check_folder_creatable

    # A bad -o fails before the work; run_demo creates the folder once the options are checked.
    check_folder_creatable(args.out_dir, "output folder")
    ref = model_ref(args)
    if ref is None:
        announce_builtin_model()
    scores = run_demo(args.out_dir, args.sir, ref, args.device, args.overwrite,
                      **refinement_options(args))
    si = scores["per_speaker"]
    print(f"mixture of 2 speakers at {args.sir:+.1f} dB SIR -> {args.out_dir}/")
    for k in range(len(si["si_sdr"])):
        print(f"  speaker{k + 1}.wav vs reference{k + 1}.wav: SI-SDR {si['si_sdr'][k]:6.2f} dB  "
              f"(improvement {si['si_sdri'][k]:+.2f} dB)")
    print(f"mean SI-SDRi: {scores['si_sdri']:.2f} dB (refinements: {scores['refinements']})")
    print(f"wrote {', '.join(OUTPUT_NAMES)} (speakerN.wav is the estimate of referenceN.wav)")
    return 0

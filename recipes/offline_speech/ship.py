"""Turn a trained checkpoint into the package's built-in model file.

    python recipes/offline_speech/ship.py exp/run/best.pt --train-utterances /work/corpus/train \
        --training-json info.json

Keeps the model weights and config, sets the output level (``mossformer2.training.calibration``: one gain on
the decoder, measured on training-speaker mixtures, so no held-out speaker is used), and stores the training
provenance under ``"training"`` (the input's own ``"training"`` entry, updated with ``--training-json``).
``--polarity-ensemble`` / ``--wiener-filter`` / ``--mixture-consistency`` record the inference-time refinements
measured with this model (``"separation"`` entry: the ``Separator``'s defaults for it; without the flags the
input's entry is kept).
The file is written atomically; the output gains applied so far are multiplied into ``"output_gain"``.

A resumable training state (a run's ``last.pt``: ``optimizer`` / ``trainer_state`` / ``ema``) is refused unless
``--weights`` says which of its weights to ship: its ``"model"`` holds the raw weights, while validation scored
the moving average (``"ema"``) when the run kept one; ``best.pt`` holds those validated weights.
``--no-calibrate`` on a never-calibrated input (no ``"output_gain"``) needs ``--force``, and such a model is
not shipped with mixture consistency, which needs outputs at the level of the sources.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mossformer2.checkpoint import load_model, read_checkpoint, save_checkpoint, select_weights
from mossformer2.data.datasets import AudioStore
from mossformer2.data.dynamic_mixing import DynamicMixingDataset, load_utterances
from mossformer2.models import MossFormer2
from mossformer2.pretrained import DEFAULT_MODEL_FILE
from mossformer2.separation_settings import REFINEMENTS, recommended_refinements
from mossformer2.training.calibration import estimate_output_gain, fold_output_gain

RESUMABLE_KEYS = ("optimizer", "trainer_state", "ema")  # what the trainer's last.pt holds and best.pt does not


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="trained checkpoint (best.pt of a run, or a shipped file)")
    parser.add_argument("--out", default=str(DEFAULT_MODEL_FILE), help="where to write (default: the package's file)")
    parser.add_argument("--train-utterances",
                        help="training speakers <root>/<speaker>/*.wav for the level calibration")
    parser.add_argument("--examples", type=int, default=200, help="calibration mixtures (default 200)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each calibration mixture")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--training-json", help="JSON object merged into the stored training provenance")
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                        help="measure and fold the output gain (default); --no-calibrate keeps the weights as they are")
    parser.add_argument("--force", action="store_true",
                        help="with --no-calibrate: ship a checkpoint that was never calibrated (no output_gain)")
    parser.add_argument("--weights", choices=("ema", "model"),
                        help="for a resumable training state (last.pt): ship its moving average ('ema', what "
                             "validation scored) or its raw 'model' weights; not needed for best.pt")
    for name in REFINEMENTS:
        parser.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=None,
                            help=f"recommend (or not) the {name.replace('_', ' ')} for this model")
    return parser.parse_args(argv)


def pick_weights(source: dict, path: str, choice: str | None) -> tuple[MossFormer2, str]:
    """The model to ship and a line saying which weights it holds."""
    resumable = [key for key in RESUMABLE_KEYS if key in source]
    if resumable and choice is None:
        if "ema" in source:
            average, options = "its moving average ('ema') is what validation scored", "--weights ema / --weights model"
        else:
            average, options = "it keeps no average", "--weights model"
        raise SystemExit(f"{path} is a resumable training state ({', '.join(resumable)}): its 'model' holds the raw "
                         f"weights and {average}. Pass the run's best.pt (the validated weights), or choose with "
                         f"{options}")
    if choice == "ema":
        try:
            chosen, which = select_weights(source, "average")
        except ValueError as err:  # no moving average
            raise SystemExit(f"{path}: {err}; use --weights model") from None
        return load_model(chosen, weights="model"), f"weights: the {which} of {path}"
    return load_model(source, weights="model"), f"weights: 'model' of {path}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.examples <= 0 or args.seconds <= 0:
        raise SystemExit("--examples and --seconds must be > 0")
    if args.calibrate and not args.train_utterances:
        raise SystemExit("--train-utterances DIR is needed to measure the output gain (or pass --no-calibrate)")
    if args.calibrate and Path(args.train_utterances).resolve().name in ("valid", "test"):
        print(f"warning: --train-utterances {args.train_utterances} looks like a held-out split: calibrating on "
              "its speakers uses them before they are scored; use the train split", file=sys.stderr)
    source = read_checkpoint(args.checkpoint)
    model, weights = pick_weights(source, args.checkpoint, args.weights)
    calibrated = args.calibrate or "output_gain" in source
    if not calibrated and not args.force:
        raise SystemExit(f"{args.checkpoint} was never calibrated (no output_gain): a model trained with SI-SDR "
                         "puts out any level; calibrate it with --train-utterances DIR, or pass --force to ship it "
                         "uncalibrated")
    training = dict(source.get("training") or {})
    if args.training_json:
        extra = json.loads(Path(args.training_json).read_text())
        if not isinstance(extra, dict):
            raise SystemExit(f"{args.training_json} must hold a JSON object")
        training.update(extra)
    gain = 1.0
    if args.calibrate:
        rate = model.config.sample_rate
        mixtures = DynamicMixingDataset(load_utterances(args.train_utterances), model.config.num_spks,
                                        AudioStore(rate), args.examples, segment_samples=int(args.seconds * rate),
                                        seed=args.seed, fixed=True)
        gain = estimate_output_gain(model, (mixtures[i] for i in range(len(mixtures))))
        fold_output_gain(model, gain)
    total_gain = float(source.get("output_gain", 1.0)) * gain
    extra = {"training": training}
    if calibrated:  # an uncalibrated model gets no output_gain, so that shipping it again is refused too
        extra["output_gain"] = total_gain
    if "valid" in source:
        extra["valid"] = source["valid"]
    settings = recommended_refinements(source.get("separation"), args.checkpoint)
    for name in REFINEMENTS:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if settings.get("mixture_consistency") and not calibrated:
        raise SystemExit("mixture consistency needs outputs at the level of the sources (on an uncalibrated model "
                         "the residual it shares out is mostly level error): calibrate, or pass "
                         "--no-mixture-consistency")
    if settings:
        extra["separation"] = settings
    save_checkpoint(args.out, model, epoch=int(source.get("epoch", 0)), step=int(source.get("step", 0)), extra=extra)
    if args.calibrate:
        level = f"output gain {gain:.4g} ({total_gain:.4g} in all) from {args.examples} training mixtures"
    elif calibrated:
        level = f"output gain {total_gain:.4g} kept (not measured: --no-calibrate)"
    else:
        level = "UNCALIBRATED (--no-calibrate --force: no output_gain recorded)"
    print(f"{args.out}: {weights}; {level}; separation settings {settings or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

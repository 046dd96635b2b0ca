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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mossformer2.checkpoint import load_model, read_checkpoint, save_checkpoint
from mossformer2.data.datasets import AudioStore
from mossformer2.data.dynamic_mixing import DynamicMixingDataset, load_utterances
from mossformer2.pretrained import DEFAULT_MODEL_FILE
from mossformer2.separation.refine import REFINEMENTS, recommended_refinements
from mossformer2.training.calibration import estimate_output_gain, fold_output_gain


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
    for name in REFINEMENTS:
        parser.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=None,
                            help=f"recommend (or not) the {name.replace('_', ' ')} for this model")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.examples <= 0 or args.seconds <= 0:
        raise SystemExit("--examples and --seconds must be > 0")
    if args.calibrate and not args.train_utterances:
        raise SystemExit("--train-utterances DIR is needed to measure the output gain (or pass --no-calibrate)")
    source = read_checkpoint(args.checkpoint)
    model = load_model(source)
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
    extra = {"training": training, "output_gain": total_gain}
    if "valid" in source:
        extra["valid"] = source["valid"]
    settings = recommended_refinements(source.get("separation"), args.checkpoint)
    for name in REFINEMENTS:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if settings:
        extra["separation"] = settings
    save_checkpoint(args.out, model, epoch=int(source.get("epoch", 0)), step=int(source.get("step", 0)), extra=extra)
    measured = f"from {args.examples} training mixtures" if args.calibrate else "(not measured: --no-calibrate)"
    print(f"{args.out}: output gain {gain:.4g} ({total_gain:.4g} in all) {measured}; "
          f"separation settings {settings or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

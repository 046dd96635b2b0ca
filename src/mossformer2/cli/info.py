"""``mossformer2 info``: configuration, parameter count and checkpoint summary."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "info", help="print a model's configuration and parameter count",
        description="Print the configuration and parameter count of a named model or a checkpoint "
                    "(for a checkpoint also its epoch, step and keys).")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--model", default=None, help="named configuration: MossFormer2 (default), MossFormer2-S")
    group.add_argument("--checkpoint", default=None, help="checkpoint file (official or ours)")
    return parser


def run(args: argparse.Namespace) -> int:
    from mossformer2.checkpoint import checkpoint_summary, load_model
    from mossformer2.models import build_model, count_parameters

    if args.checkpoint:
        summary = checkpoint_summary(args.checkpoint)
        model = load_model(args.checkpoint)
        print(f"checkpoint: {summary['path']}")
        print(f"container keys: {', '.join(summary['container_keys'])}")
        print(f"epoch: {summary['epoch']}  step: {summary['step']}  "
              f"optimizer state: {'yes' if summary['has_optimizer_state'] else 'no'}")
        print(f"tensors: {summary['num_tensors']} ({summary['num_rotary_aliases']} rotary aliases), "
              f"elements: {summary['num_elements']:,}")
        if summary["separation"]:
            print("recommended separation settings: "
                  + ", ".join(f"{k}={v}" for k, v in summary["separation"].items()))
    else:
        model = build_model(args.model or "MossFormer2")
        print(f"model: {args.model or 'MossFormer2'}")
    print("config:")
    for key, value in model.config.to_dict().items():
        print(f"  {key}: {value}")
    print(f"parameters: {count_parameters(model):,}")
    return 0

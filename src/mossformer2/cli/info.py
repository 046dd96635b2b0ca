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
    group.add_argument("--checkpoint", default=None,
                       help="checkpoint file (official or ours), or an export (.onnx or TorchScript)")
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from mossformer2.checkpoint import checkpoint_summary, is_torchscript_archive, load_model
    from mossformer2.models import build_model, count_parameters

    if args.checkpoint and str(args.checkpoint).lower().endswith(".onnx"):
        from mossformer2.runtime import OnnxRuntimeModel

        model = OnnxRuntimeModel(args.checkpoint, providers=["CPUExecutionProvider"])
        print(f"ONNX export: {args.checkpoint}")
        print(f"input shape: {model.input_shape} ({'dynamic' if model.dynamic_length else 'fixed'} length)")
        _print_refinements(model.separation_settings)
    elif args.checkpoint and is_torchscript_archive(args.checkpoint):
        from mossformer2.export import TorchScriptModel

        model = TorchScriptModel(args.checkpoint)
        print(f"TorchScript export: {args.checkpoint}")
        _print_refinements(model.separation_settings)
    elif args.checkpoint:
        summary = checkpoint_summary(args.checkpoint)
        model = load_model(args.checkpoint)
        print(f"checkpoint: {summary['path']}")
        print(f"container keys: {', '.join(summary['container_keys'])}")
        print(f"epoch: {summary['epoch']}  step: {summary['step']}  "
              f"optimizer state: {'yes' if summary['has_optimizer_state'] else 'no'}")
        print(f"tensors: {summary['num_tensors']} ({summary['num_rotary_aliases']} rotary aliases), "
              f"elements: {summary['num_elements']:,}")
        _print_refinements(summary["separation"])
    else:
        model = build_model(args.model or "MossFormer2")
        print(f"model: {args.model or 'MossFormer2'}")
    print("config:")
    for key, value in model.config.to_dict().items():
        print(f"  {key}: {value}")
    if isinstance(model, torch.nn.Module):  # an ONNX session holds no parameters to count
        print(f"parameters: {count_parameters(model):,}")
    return 0


def _print_refinements(settings: dict[str, bool]) -> None:
    if settings:
        print("recommended separation settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))

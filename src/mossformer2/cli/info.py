"""``mossformer2 info``: configuration, parameter count and checkpoint summary."""

from __future__ import annotations

import argparse

from mossformer2.cli import add_model_arguments, chosen_model_config


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "info", help="print a model's configuration and parameter count",
        description="Print the configuration and parameter count of a named model or a checkpoint "
                    "(for a checkpoint also its epoch, step and keys). Without options: the built-in model, "
                    "which `separate` uses when given no --model or --checkpoint.")
    add_model_arguments(parser, "checkpoint file (official or ours) or folder, hub id (OWNER/NAME), or an export "
                                "(.onnx or TorchScript)",
                        "named configuration: MossFormer2, MossFormer2-S; or a named model as in `separate --model`: "
                        "'default' (built in: what `info` shows without options), MossFormer2_SS_16K, a hub id")
    return parser


def run(args: argparse.Namespace) -> int:
    from mossformer2.separation.loading import refuse_config_for_export
    from mossformer2.utils import is_onnx_path

    config = chosen_model_config(args)
    if is_onnx_path(args.checkpoint):
        return _info_onnx(args.checkpoint)  # without torch, as separating with an ONNX export
    import torch

    from mossformer2.checkpoint import checkpoint_summary, is_torchscript_archive, load_model, read_checkpoint
    from mossformer2.hub import model_checkpoint, resolve_checkpoint
    from mossformer2.models import NAMED_CONFIGS, build_model, count_parameters, get_config

    path = resolve_checkpoint(args.checkpoint) if args.checkpoint else None  # a file, folder or hub id
    if args.model is None and path is None:
        print("the built-in model, which `separate` uses without --model/--checkpoint (`--model MossFormer2`: the "
              "full architecture)")
        path = model_checkpoint("default")
    elif args.model is not None:
        try:
            get_config(args.model)  # a configuration name (MossFormer2_SS_16K too: its architecture, no download)
        except ValueError:
            try:  # else a model name, as `separate --model` and `evaluate --model` read it
                path = model_checkpoint(args.model)
            except ValueError as err:
                raise ValueError(f"{err}; or a configuration: {', '.join(NAMED_CONFIGS)}") from None
    if path is not None and is_torchscript_archive(path):
        refuse_config_for_export(path, config)
        from mossformer2.export import torchscript_metadata

        config, settings = torchscript_metadata(path)  # its code is not loaded: info runs nothing
        model = build_model(config)
        print(f"TorchScript export: {path}")
        _print_refinements(settings)
    elif path is not None:
        checkpoint = read_checkpoint(path)  # once: the official file is 670 MB
        summary = checkpoint_summary(path, checkpoint)
        model = load_model(checkpoint, config, source=path)
        print(f"checkpoint: {summary['path']}")
        if summary["container_keys"]:
            print(f"container keys: {', '.join(summary['container_keys'])}")
            print(f"epoch: {summary['epoch']}  step: {summary['step']}  "
                  f"optimizer state: {'yes' if summary['has_optimizer_state'] else 'no'}")
        else:
            print("container: none, a bare state dict (no epoch, step or optimizer state)")
        print(f"tensors: {summary['num_tensors']} ({summary['num_rotary_aliases']} rotary aliases), "
              f"elements: {summary['num_elements']:,}")
        if summary["weights"] != "model":
            print(f"weights used to separate: the {summary['weights']}; the raw weights are in 'model'")
        if summary["validation"]:
            print(f"validation: {summary['validation']}")
        _print_refinements(summary["separation"])
        if config is not None:
            print(f"config: from --model-config {args.model_config}")
        elif summary["config_inferred"]:
            print("config read from the tensor shapes (the file stores none): group_size and dropout (and "
                  "rotary_dim, where the file has no rotary table) leave no trace in the weights, so the official "
                  "values below are assumed")
    else:
        model = build_model(args.model)
        print(f"model: {args.model}")
    _print_config(model.config)
    if isinstance(model, torch.nn.Module):
        print(f"parameters: {count_parameters(model):,}")
    return 0


def _info_onnx(path: str) -> int:
    from mossformer2.runtime import OnnxRuntimeModel

    model = OnnxRuntimeModel(path, providers=["CPUExecutionProvider"])
    print(f"ONNX export: {path}")
    print(f"input shape: {model.input_shape} ({'dynamic' if model.dynamic_length else 'fixed'} length)")
    _print_refinements(model.separation_settings)
    _print_config(model.config)
    return 0


def _print_config(config) -> None:
    print("config:")
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")


def _print_refinements(settings: dict[str, bool]) -> None:
    if settings:
        print("recommended separation settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))

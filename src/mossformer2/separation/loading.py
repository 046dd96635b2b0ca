"""``load_separation_model``: the model behind a ``--model`` reference, as torch module or ONNX Runtime wrapper.

An ``.onnx`` reference never imports torch (an ONNX deployment runs without it); everything else needs it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mossformer2.utils import TORCHSCRIPT_SUFFIX, is_auto_device, is_onnx_path, is_torchscript_name, resolve_device

if TYPE_CHECKING:
    import torch

    from mossformer2.models.config import MossFormer2Config


def load_separation_model(ref: str | Path | None = None, device: str | torch.device = "auto",
                          filename: str | None = None, cache_dir: str | Path | None = None,
                          config: MossFormer2Config | str | Path | None = None) -> Any:
    """The shipped model (``ref=None``), a model name as ``mossformer2 separate --model`` takes it (``"default"``,
    ``"MossFormer2_SS_16K"``), a checkpoint (file, folder, hub id) or an exported ``.onnx`` or TorchScript file.
    ``filename`` / ``cache_dir``: as in ``hub.resolve_checkpoint``. ``config``: the architecture of a checkpoint
    saved without one (``checkpoint.load_model``'s ``config``); exports carry their own and refuse it.

    A checkpoint's ``"separation"`` entry (``{name: bool}`` for names in ``separation_settings.REFINEMENTS``, written
    by the recipe that validated them) becomes ``model.separation_settings``, the ``Separator``'s defaults;
    ``mossformer2 export`` carries it into the ONNX and TorchScript files, whose wrappers expose it the same way.
    """
    from mossformer2.hub import checkpoint_path, model_checkpoint

    if ref is None:
        path = model_checkpoint("default", filename, cache_dir)  # the shipped file (filename= refused)
    elif is_onnx_path(ref):
        path = Path(os.path.expanduser(ref))
    else:
        path = checkpoint_path(ref, filename, cache_dir)
    if is_onnx_path(path):  # also one that filename= picked in a folder or hub repository
        refuse_config_for_export(path, config)
        from mossformer2.runtime import OnnxRuntimeModel, providers_for_device

        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        # "cpu" keeps ONNX Runtime off CUDA; "cuda" must start there; "auto" may fall back to the CPU.
        return OnnxRuntimeModel(path, providers=None if is_auto_device(device) else providers_for_device(device))
    try:
        from mossformer2.checkpoint import TorchScriptFileError, load_model, read_checkpoint
    except ModuleNotFoundError as err:
        if err.name != "torch":
            raise
        raise ModuleNotFoundError("PyTorch is not installed: the built-in model, .pt checkpoints and TorchScript "
                                  "exports need it (pip install torch); an exported .onnx model runs without it",
                                  name="torch") from None
    try:
        checkpoint = read_checkpoint(path)
    except TorchScriptFileError:  # read_checkpoint recognises the export by its contents
        refuse_config_for_export(path, config)
        check_torchscript_allowed(path)
        from mossformer2.export import TorchScriptModel

        return TorchScriptModel(path).to(resolve_device(device))
    # (with its model.separation_settings)
    return load_model(checkpoint, config, device=resolve_device(device), source=path)


def refuse_config_for_export(path: str | Path, config: object) -> None:
    """ValueError when ``config`` (a model config) is given for the export at ``path``."""
    if config is not None:
        raise ValueError(f"{path} is an export, which runs the architecture it was exported with: a model config "
                         "applies to PyTorch checkpoints only")


def check_torchscript_allowed(path: Path) -> None:
    """ValueError unless the TorchScript export at ``path`` may run: a program, not weights (which load with
    ``weights_only``), so only from a file named ``*.ts.pt`` as ``mossformer2 export`` names it, and which the
    caller named itself (``hub.checkpoint_path`` takes no such file from a folder or a hub repository). A
    TorchScript file named as a checkpoint never runs."""
    if not is_torchscript_name(path):
        raise ValueError(f"{path} is a TorchScript program, not a checkpoint of weights: a program runs only from a "
                         f"file named *{TORCHSCRIPT_SUFFIX} (as `mossformer2 export` names it); if you trust its "
                         "source, rename it")

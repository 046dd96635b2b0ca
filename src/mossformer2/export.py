"""Deployment: export a MossFormer2 to ONNX or TorchScript, and run an exported TorchScript file.

The exported graphs take ``wave [B, T]`` float32 at ``config.sample_rate`` and return ``sources [B, S, T]``.
ONNX files carry the model config as JSON in their metadata (key ``mossformer2_config``), so that
``mossformer2.runtime.OnnxRuntimeModel`` (re-exported here; ``Separator`` on top of it) needs nothing but the
``.onnx`` file, and no torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mossformer2.models import MossFormer2, MossFormer2Config
from mossformer2.runtime import (
    CONFIG_METADATA_KEY,
    DYNAMIC_LENGTH_METADATA_KEY,
    INPUT_NAME,
    OUTPUT_NAME,
    SEPARATION_METADATA_KEY,
    OnnxRuntimeModel,
    import_optional,
)
from mossformer2.separation_settings import parse_export_json, recommended_refinements
from mossformer2.utils import TORCHSCRIPT_SUFFIX, atomic_path, is_onnx_path, is_torchscript_name

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
TORCHSCRIPT_METHODS = ("trace", "script")


def example_length(model: MossFormer2, seconds: float) -> int:
    """Samples of a ``seconds``-long example (the fixed input length of a ``--no-dynamic-length`` export)."""
    return int(seconds * model.config.sample_rate)


def example_input(model: MossFormer2, seconds: float = 1.0, batch_size: int = 2) -> torch.Tensor:
    """A reproducible noise input ``[batch_size, T]`` on the model's device.

    The default length (1 s) is not a multiple of the attention group size in frames for the shipped configs,
    so the padding path is traced.
    """
    length = max(example_length(model, seconds), model.min_input_length)
    generator = torch.Generator().manual_seed(0)
    wave = 0.1 * torch.randn(batch_size, length, generator=generator)
    return wave.to(next(model.parameters()).device)


@contextlib.contextmanager
def _eval_float32_cpu(model: MossFormer2) -> Iterator[MossFormer2]:
    """The model in eval mode, float32, on the CPU for the duration of an export; restored afterwards."""
    if not isinstance(model, MossFormer2):
        raise ValueError(f"export needs a mossformer2.MossFormer2 model, got {type(model).__name__}")
    param = next(model.parameters())
    device, dtype, training = param.device, param.dtype, model.training
    model.to(device="cpu", dtype=torch.float32).eval()
    try:
        yield model
    finally:
        model.to(device=device, dtype=dtype).train(training)


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Only errors from logger ``name`` while exporting: the ONNX exporter warns about every optional operator
    library it does not find (torchvision), which says nothing about this model."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_opset(opset: int) -> None:
    """Raise ValueError unless ``opset`` is one the exporter writes and the installed onnx knows."""
    onnx = import_optional("onnx", "ONNX export")
    newest = onnx.defs.onnx_opset_version()
    # Below 18 the exporter falls back to its own opset without a word; above onnx's newest it fails deep inside.
    if not DEFAULT_OPSET <= int(opset) <= newest:
        raise ValueError(f"ONNX opset {opset} is not available: the exporter with this onnx ({onnx.__version__}) "
                         f"writes {DEFAULT_OPSET} to {newest}")


def check_export_name(path: str | Path, format: str) -> None:
    """ValueError unless an export to ``path`` in ``format`` ("onnx" | "torchscript") is named so that it is
    recognised: ``separate``, ``info`` and ``Separator.from_pretrained`` tell an ONNX file by its suffix."""
    if format == "onnx" and not is_onnx_path(path):
        raise ValueError(f"{path}: an ONNX export's name must end in .onnx; `separate`, `info` and "
                         "Separator.from_pretrained recognise ONNX files by that suffix")
    if format == "torchscript" and not is_torchscript_name(path):
        raise ValueError(f"{path}: a TorchScript export's name must end in {TORCHSCRIPT_SUFFIX}: TorchScript is a "
                         "program, and `separate` and Separator.from_pretrained run one only from a file named so")


def _checked_settings(model: MossFormer2) -> dict[str, bool]:
    """The model's ``separation_settings`` as an export stores them, checked as the loaders will read them back."""
    return recommended_refinements(getattr(model, "separation_settings", None), "the model's separation_settings")


def export_onnx(model: MossFormer2, path: str | Path, dynamic_length: bool = True, opset: int = DEFAULT_OPSET,
                example: torch.Tensor | None = None) -> Path:
    """Export ``model`` to an ONNX file (written atomically) with its config in the metadata, and its
    ``separation_settings`` (recommended refinements, see ``load_separation_model``) if it has them.

    Args:
        dynamic_length: symbolic batch and time axes (any ``T >= model.min_input_length``); otherwise the graph
            is fixed to the shape of ``example``.
        opset: ONNX opset version (18 or newer for the torch.export-based exporter, up to the newest the installed
            onnx knows; :func:`check_opset`).
        example: input ``[B, T]`` to trace with (default: :func:`example_input`; a dynamic export repeats a batch
            of 1 to 2).
    Returns the path.
    """
    check_export_name(path, "onnx")
    onnx = import_optional("onnx", "ONNX export")
    import_optional("onnxscript", "ONNX export")  # torch's exporter needs it; fail before tracing
    check_opset(opset)
    settings = _checked_settings(model)  # before the export, not after it
    path = Path(path)
    with _eval_float32_cpu(model) as model:
        example = (example_input(model, batch_size=1) if example is None else example).detach().float().cpu()
        if example.dim() != 2:
            raise ValueError(f"example input must be [batch, samples], got shape {tuple(example.shape)}")
        if dynamic_length and example.shape[0] == 1:  # the exporter fixes an axis of size 1 to 1: batch 2 keeps
            example = example.repeat(2, 1)            # it symbolic (a fixed shape takes one item at a time)
        dynamic_shapes = None
        if dynamic_length:
            batch = torch.export.Dim("batch", min=1)
            samples = torch.export.Dim("samples", min=model.min_input_length)
            dynamic_shapes = {"wave": {0: batch, 1: samples}}
        with atomic_path(path) as tmp, warnings.catch_warnings(), _quiet_logger("torch.onnx"):
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not actionable here
            torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=True, external_data=False,
                              dynamic_shapes=dynamic_shapes, verbose=False)
            proto = onnx.load(str(tmp))
            meta = {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict()),
                    DYNAMIC_LENGTH_METADATA_KEY: str(bool(dynamic_length)).lower(),
                    SEPARATION_METADATA_KEY: json.dumps(settings)}
            for key, value in meta.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            onnx.save(proto, str(tmp))
    log.debug("wrote ONNX model %s", path)
    return path


def export_torchscript(model: MossFormer2, path: str | Path, method: str = "trace",
                       example: torch.Tensor | None = None) -> Path:
    """Export ``model`` to a TorchScript file (written atomically) loadable with ``torch.jit.load``.

    ``method="trace"`` records the ops for ``example`` (any length works afterwards: every shape-dependent
    value is computed with tensor ops); ``"script"`` compiles the Python code. The config is stored in the
    archive's extra files as ``config.json``, the model's ``separation_settings`` as ``separation.json``.
    """
    if method not in TORCHSCRIPT_METHODS:
        raise ValueError(f"TorchScript method must be one of {list(TORCHSCRIPT_METHODS)}, got {method!r}")
    check_export_name(path, "torchscript")
    settings = _checked_settings(model)
    path = Path(path)
    with _eval_float32_cpu(model) as model, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated upstream; the warning is not actionable
        if method == "script":
            compiled = torch.jit.script(model)
        else:
            example = example_input(model) if example is None else example.detach().float().cpu()
            with torch.no_grad():
                compiled = torch.jit.trace(model, (example,), check_trace=False)
        extra = {"config.json": json.dumps(model.config.to_dict()),
                 "separation.json": json.dumps(settings)}
        with atomic_path(path) as tmp:
            torch.jit.save(compiled, str(tmp), _extra_files=extra)
    log.debug("wrote TorchScript model %s (%s)", path, method)
    return path


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, MossFormer2Config]:
    """Load an exported TorchScript file and the config stored beside the graph."""
    module, config, _ = _load_torchscript_files(path)
    return module, config


def torchscript_metadata(path: str | Path) -> tuple[MossFormer2Config, dict[str, bool]]:
    """The config and separation settings a TorchScript export stores beside its graph, read from the archive
    without loading its code (``mossformer2 info`` shows them for any such file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TorchScript model not found: {path}")
    wanted = ("config.json", "separation.json")
    try:
        with zipfile.ZipFile(path) as archive:  # torch.jit.save's extra files: <archive>/extra/<name>
            extra = {name.rsplit("/", 1)[-1]: archive.read(name).decode("utf-8") for name in archive.namelist()
                     if any(name.endswith(f"/extra/{w}") for w in wanted)}
    except (zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a TorchScript export of mossformer2 ({err})") from err
    if not extra.get("config.json"):
        raise ValueError(f"{path} has no mossformer2 config.json: was it written by `mossformer2 export`?")
    separation = recommended_refinements(parse_export_json(extra.get("separation.json") or "{}", path,
                                                           "separation.json"), path)
    return MossFormer2Config.from_dict(parse_export_json(extra["config.json"], path, "config.json")), separation


def _load_torchscript_files(path: str | Path) -> tuple[torch.jit.ScriptModule, MossFormer2Config, dict[str, bool]]:
    config, separation = torchscript_metadata(path)  # (also checks that the file exists)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu")
    return module.eval(), config, separation


class TorchScriptModel(torch.nn.Module):
    """An exported TorchScript file as a separation model: ``.config`` and ``forward(wave [B, T]) -> [B, S, T]``.

    Like the ONNX model it takes no ``lengths`` (a traced graph has one input), so ``Separator`` batches only
    inputs of equal length with it. It runs in float32 (``float32_only``; ``Separator`` ignores a reduced
    ``dtype`` with a warning): under bfloat16 autocast a traced graph, whose float32 casts are recorded in it,
    failed on a dtype mismatch or ran for minutes without finishing.
    """

    float32_only = True

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.module, self.config, self.separation_settings = _load_torchscript_files(path)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        with torch.autocast(wave.device.type, enabled=False):
            return self.module(wave.float())


def verify_export(model: MossFormer2, path: str | Path, format: str, wave: torch.Tensor | None = None) -> float:
    """Run the exported file and ``model`` (eval, float32, CPU) on ``wave`` and return the max abs difference.

    The default input is 1.37 s of noise: a length unlike the export example, to exercise a dynamic time axis.
    """
    if format == "onnx":
        exported: Any = OnnxRuntimeModel(path, providers=["CPUExecutionProvider"])
        if not exported.dynamic_length and wave is None:
            wave = torch.zeros(exported.input_shape, dtype=torch.float32).normal_(0, 0.1)
    elif format == "torchscript":
        exported, _ = load_torchscript(path)
    else:
        raise ValueError(f"unknown export format {format!r}: use 'onnx' or 'torchscript'")
    with _eval_float32_cpu(model) as model:
        if wave is None:
            wave = example_input(model, seconds=1.37, batch_size=1)
        with torch.no_grad():
            expected = model(wave)
            got = torch.as_tensor(exported(wave))
    if got.shape != expected.shape:
        raise ValueError(f"exported model returned shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
    return float((got - expected).abs().max())

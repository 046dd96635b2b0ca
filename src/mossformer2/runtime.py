"""Running an exported ``.onnx`` MossFormer2 with ONNX Runtime, without torch.

Nothing here imports torch (nor does ``mossformer2.separation`` with such a model), so a deployment that
separates with an ONNX export needs only NumPy, SciPy, PyYAML, soundfile, soxr, tqdm and onnxruntime. The files
are written by ``mossformer2.export.export_onnx``; they carry the model config as JSON in their metadata.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mossformer2.models.config import MossFormer2Config
from mossformer2.separation_settings import parse_export_json, recommended_refinements
from mossformer2.utils import is_auto_device, loaded_torch

if TYPE_CHECKING:
    import torch

CONFIG_METADATA_KEY = "mossformer2_config"
SEPARATION_METADATA_KEY = "mossformer2_separation"  # the checkpoint's recommended refinements, as JSON
DYNAMIC_LENGTH_METADATA_KEY = "mossformer2_dynamic_length"  # "true" / "false"; files without it are dynamic
INPUT_NAME = "wave"
OUTPUT_NAME = "sources"


class MissingDependencyError(ImportError, ValueError):
    """An optional package that a feature needs is not installed. Also a ``ValueError``, so that the
    ``mossformer2`` command reports it as a one-line user error instead of a traceback."""


def import_optional(name: str, purpose: str) -> Any:
    """``import name``, or a :class:`MissingDependencyError` that says how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise MissingDependencyError(f"{purpose} needs the Python package '{name}', which is not installed: "
                                     f"pip install {name} (or pip install 'mossformer2[onnx]')",
                                     name=name) from err


def providers_for_device(device: Any = "auto", available: Sequence[str] | None = None) -> list[Any]:
    """ONNX Runtime execution providers for a device name, as ``--device`` reads it for torch models.

    "auto": CUDA when this onnxruntime build has it, else the CPU; "cpu": the CPU only; "cuda" / "cuda:N": that
    GPU, or a clear error when this onnxruntime build has no CUDA provider (no silent fallback to the CPU).
    """
    name = "auto" if is_auto_device(device) else str(device).strip().lower()
    if available is None:
        available = import_optional("onnxruntime", "running an ONNX model").get_available_providers()
    if name == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if name == "cpu":
        return ["CPUExecutionProvider"]
    kind, _, index = name.partition(":")
    if kind != "cuda" or not (name == "cuda" or index.isdigit()):
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if "CUDAExecutionProvider" not in available:
        raise ValueError(f"device {device!r} requested, but this onnxruntime build has no CUDA provider (it has "
                         f"{', '.join(available)}): install onnxruntime-gpu, or use --device cpu")
    return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]


def _threads_from_environment() -> int | None:
    """``OMP_NUM_THREADS`` as a positive int, else None: ONNX Runtime ignores it, torch and NumPy's BLAS read it."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


class OnnxRuntimeModel:
    """An exported ``.onnx`` MossFormer2 run by ONNX Runtime, usable where a torch model is expected.

    ``model(wave)``: ``[B, T]`` float32 (torch or numpy) -> ``[B, S, T]`` of the same kind. ``.config`` is the
    ``MossFormer2Config`` stored in the file, ``.separation_settings`` the refinements its checkpoint recommended
    (the ``Separator``'s defaults); ``.eval()`` / ``.to()`` are no-ops so ``Separator`` can treat it like a module.

    Args:
        path: the ``.onnx`` file written by :func:`export_onnx`.
        providers: ONNX Runtime execution providers (default: CUDA when this onnxruntime build has it, else CPU;
            :func:`providers_for_device` gives them for a device name).
        num_threads: intra-op threads (default: ``OMP_NUM_THREADS`` where it is set, as torch reads it; else
            ONNX Runtime's choice, all cores).
    """

    def __reduce__(self) -> tuple:
        """Pickled and deep-copied as its arguments: the copy opens the file again (a Separator on an ONNX model
        then goes to worker processes, which start them by pickling)."""
        return (OnnxRuntimeModel, self._arguments)

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None,
                 num_threads: int | None = None) -> None:
        ort = import_optional("onnxruntime", "running an ONNX model")
        path = Path(os.path.expanduser(path))  # (`--checkpoint=~/m.onnx`: no shell expands ~ after "=")
        # __reduce__: a session does not pickle, the file does (resolved: a worker may start in another folder)
        self._arguments = (path.resolve(), None if providers is None else tuple(providers), num_threads)
        self.path = path
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        asked = providers is not None  # "auto" may fall back to the CPU; providers asked for must start
        if providers is None:
            providers = providers_for_device("auto", ort.get_available_providers())
        options = ort.SessionOptions()
        num_threads = num_threads or _threads_from_environment()
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=list(providers))
        except Exception as err:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"cannot load ONNX model {self.path}: {err}") from err
        # ONNX Runtime falls back to the CPU with a mere warning when the first provider asked for cannot start
        # (a CPU-only build, CUDA libraries that fail to load): say so instead.
        first = next((p[0] if isinstance(p, tuple) else p for p in providers), None)
        if asked and first is not None and first not in self.session.get_providers():
            raise ValueError(f"ONNX Runtime could not start {first} for {self.path} (it runs on "
                             f"{', '.join(self.session.get_providers())}): check the onnxruntime-gpu install "
                             "and its CUDA libraries, or use --device cpu")
        metadata = self.session.get_modelmeta().custom_metadata_map
        if CONFIG_METADATA_KEY not in metadata:
            raise ValueError(f"{self.path} has no '{CONFIG_METADATA_KEY}' metadata: export it with "
                             "`mossformer2 export` (or mossformer2.export.export_onnx)")
        self.config = MossFormer2Config.from_dict(
            parse_export_json(metadata[CONFIG_METADATA_KEY], self.path, CONFIG_METADATA_KEY))
        self.separation_settings = recommended_refinements(parse_export_json(
            metadata.get(SEPARATION_METADATA_KEY, "{}"), self.path, SEPARATION_METADATA_KEY), self.path)
        self.dynamic_length = metadata.get(DYNAMIC_LENGTH_METADATA_KEY, "true") == "true"
        self.input_shape = self.session.get_inputs()[0].shape  # ints for fixed axes, names for dynamic ones
        self.min_input_length = self.config.min_input_length

    def __call__(self, wave: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        torch = loaded_torch()
        is_torch = torch is not None and isinstance(wave, torch.Tensor)
        floating = wave.is_floating_point() if is_torch else np.issubdtype(np.asarray(wave).dtype, np.floating)
        if not floating:  # as the torch model: int16 PCM cast to float32 would be 32768x too loud
            raise ValueError(f"the ONNX model expects floating-point samples in [-1, 1], got dtype {wave.dtype}; "
                             "convert integer PCM first (e.g. int16 / 32768)")
        array = wave.detach().cpu().float().numpy() if is_torch else np.asarray(wave, dtype=np.float32)
        self._check_input(array)
        if self.input_shape[0] == 1 and array.shape[0] > 1:  # a fixed batch of 1: one item at a time
            sources = np.concatenate([self._run(array[i:i + 1]) for i in range(array.shape[0])])
        else:
            sources = self._run(array)
        return torch.from_numpy(sources) if is_torch else sources

    def _run(self, array: np.ndarray) -> np.ndarray:
        (sources,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(array)})
        return sources

    def _check_input(self, array: np.ndarray) -> None:
        if array.ndim != 2:
            raise ValueError(f"the ONNX model expects a waveform [batch, samples], got shape {array.shape}")
        if array.shape[-1] < self.min_input_length:
            raise ValueError(f"input has {array.shape[-1]} samples but the network needs at least "
                             f"{self.min_input_length}")
        if not np.isfinite(array).all():
            raise ValueError("input contains NaN or infinite samples")
        for axis, expected in enumerate(self.input_shape):
            if axis == 0 and expected == 1:
                continue  # a fixed batch of 1 takes larger batches item by item
            if isinstance(expected, int) and array.shape[axis] != expected:
                raise ValueError(f"this ONNX model was exported with a fixed input shape {self.input_shape}; got "
                                 f"{array.shape}. Re-export with --dynamic-length for other lengths")

    def eval(self) -> OnnxRuntimeModel:
        return self

    def to(self, *args: Any, **kwargs: Any) -> OnnxRuntimeModel:
        return self

    def __repr__(self) -> str:
        return f"OnnxRuntimeModel({str(self.path)!r}, providers={self.session.get_providers()})"


__all__ = ["CONFIG_METADATA_KEY", "INPUT_NAME", "OUTPUT_NAME", "SEPARATION_METADATA_KEY", "MissingDependencyError",
           "OnnxRuntimeModel", "import_optional", "providers_for_device"]

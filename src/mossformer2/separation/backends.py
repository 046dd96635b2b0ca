"""Where and in what precision a ``Separator``'s model runs: a torch module (device, autocast dtype, compiled
layers, CUDA graphs), or an exported model's callable (ONNX Runtime), whose device was chosen when it was loaded.

torch is imported inside the torch functions only: the callable path runs without it.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple

from mossformer2.utils import dtype_name, is_auto_device, loaded_torch, resolve_device, resolve_dtype

if TYPE_CHECKING:
    import torch

    from mossformer2.separation.cuda_graphs import CudaGraphModel

# The warnings below are raised for the line that called Separator(...): stacklevel 3 from a function that
# Separator.__init__ calls.


class TorchSetup(NamedTuple):
    """A torch model made ready to run (:func:`prepare_torch_model`)."""

    model: Any  # on ``device``; a float16 model on the CPU cast to float32
    device: torch.device
    dtype: torch.dtype  # autocast precision (float32: no autocast)
    input_dtype: torch.dtype  # the weights' dtype: a model cast to bf16 / fp16 takes its input in it
    graphs: CudaGraphModel | None  # replays captured CUDA graphs (cuda_graphs on CUDA, in chunks), else None


def is_torch_module(model: Any) -> bool:
    torch = loaded_torch()  # a module exists only if torch is loaded: never import it here
    return torch is not None and isinstance(model, torch.nn.Module)


def prepare_torch_model(model: Any, device: str | torch.device, dtype: str | torch.dtype, *, chunked: bool,
                        cuda_graphs: bool, compile_layers: bool) -> TorchSetup:
    """Resolve ``device`` and ``dtype`` for ``model`` (falling back to float32 where the CPU or a TorchScript
    export needs it, with a warning), move it there, compile its layers and set up CUDA graphs as asked."""
    import torch

    autocast = resolve_dtype(dtype)
    device = resolve_device(device)
    if autocast == torch.float16 and device.type != "cuda":
        warnings.warn("float16 inference needs CUDA; using float32 on the CPU (bfloat16 works on CPU)",
                      stacklevel=3)
        autocast = torch.float32
    if autocast != torch.float32 and getattr(model, "float32_only", False):  # a TorchScript export
        warnings.warn(f"the exported TorchScript model runs in float32 only; ignoring dtype "
                      f"{dtype_name(dtype)}", stacklevel=3)
        autocast = torch.float32
    # A model cast to half precision (model.bfloat16() / .half()) takes its input in that dtype.
    weights = next((p for p in model.parameters() if p.is_floating_point()), None)
    input_dtype = torch.float32 if weights is None else weights.dtype
    if input_dtype == torch.float16 and device.type != "cuda":
        warnings.warn("a float16 model needs CUDA (the CPU's float16 convolutions are very slow); "
                      "casting it to float32 on the CPU", stacklevel=3)
        model, input_dtype = model.float(), torch.float32
    # Moved (a float16 model on the CPU also cast) in place, but its train / eval flag is left alone:
    # each forward pass runs in eval mode and restores the flag (a Separator used for validation inside
    # a training loop must not switch dropout off for the training, nor run with it on).
    model = model.to(device)
    if compile_layers and device.type != "cuda":  # slower on the CPU, and bf16 does not compile there
        if autocast != torch.float32 or input_dtype != torch.float32:
            raise ValueError("compile_layers (--compile) runs in float32 only on the CPU (a compiled bfloat16 "
                             "network did not finish compiling there): use a float32 model with --dtype float32, "
                             "or a GPU")
        warnings.warn("compile_layers (--compile) is meant for CUDA: on the CPU the compiled network is slower than "
                      "the eager one, after a first call that compiles it", stacklevel=3)
    if compile_layers:
        model.compile_layers()
    graphs = None
    if cuda_graphs and device.type == "cuda" and not chunked:
        warnings.warn("cuda_graphs (--cuda-graphs) replays one captured graph per chunk shape; with "
                      "chunk_seconds=None every input length would be captured anew: ignored", stacklevel=3)
    elif cuda_graphs and device.type == "cuda":
        from mossformer2.separation.cuda_graphs import CudaGraphModel

        graphs = CudaGraphModel(model, autocast, max_graphs=4)
    elif cuda_graphs:
        warnings.warn(f"cuda_graphs (--cuda-graphs) applies on CUDA only; ignored on {device}", stacklevel=3)
    return TorchSetup(model, device, autocast, input_dtype, graphs)


def exported_model_device(model: Any, device: Any, dtype: Any) -> str:
    """"cuda" or "cpu": where a callable (not torch) model runs, as its ONNX Runtime providers say. Warns when
    ``device`` asks for another; refuses a ``dtype`` other than float32 (an export runs in float32)."""
    # Where the callable runs is its own business, chosen when it was loaded (ONNX Runtime: its providers).
    session = getattr(model, "session", None)
    providers = session.get_providers() if session is not None else []
    runs_on = "cuda" if "CUDAExecutionProvider" in providers else "cpu"
    if not is_auto_device(device) and str(device).split(":")[0] != runs_on:
        warnings.warn(f"device={device!r} is not where this {type(model).__name__} runs ({runs_on}): an "
                      "exported model's device is chosen when it is loaded (Separator.from_pretrained(path, "
                      "device=...), OnnxRuntimeModel(path, providers=providers_for_device(...)))",
                      stacklevel=3)
    if dtype_name(dtype) != "float32":
        raise ValueError(f"dtype {dtype} is only available with the torch backend; the exported model "
                         "runs in float32")
    return runs_on


class EvalMode:
    """``with eval_mode(model):`` runs the block with every module of ``model`` in eval mode, then gives each its own
    train / eval flag back (``model.train()`` would set them all: a wrapper in train mode around a model in eval
    mode). One per model (:func:`eval_mode`), re-entrant across threads: the flags come back when the last block
    leaves (one thread's exit switched dropout back on while another thread's pass ran, also through two
    Separators on one model). Holds the model weakly, so that it can be collected; its submodules are listed once
    (the full model has ~1,850)."""

    def __init__(self, model: Any) -> None:
        self._model = weakref.ref(model)
        self._submodules = list(model.modules())[1:]  # they do not keep the model alive
        self._lock = threading.Lock()
        self._depth = 0
        self._training: list[Any] = []

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._training = [m for m in (self._model(), *self._submodules) if m.training]
                # object.__setattr__: the flag is a plain attribute, and nn.Module.__setattr__'s parameter / buffer /
                # submodule checks cost ~6 ms a forward over the full model's modules (~1 ms this way).
                for m in self._training:
                    object.__setattr__(m, "training", False)
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for m in self._training:
                    object.__setattr__(m, "training", True)
                self._training = []


_EVAL_MODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_EVAL_MODES_LOCK = threading.Lock()


def eval_mode(model: Any) -> EvalMode:
    """The one :class:`EvalMode` of ``model`` (a torch module), made on first use."""
    with _EVAL_MODES_LOCK:
        mode = _EVAL_MODES.get(model)
        if mode is None:
            mode = _EVAL_MODES[model] = EvalMode(model)
        return mode

"""Checkpoint I/O: the official MossFormer2_SS_16K container, bare state dicts and our own checkpoints.

Official file: ``torch.save({'model': state_dict, 'optimizer': ..., 'epoch': int, 'step': int})``.
Ours adds ``'config'`` (the MossFormer2Config as a dict) so that no shape inference is needed; the official
loader reads it too because it only looks at ``'model'``. A checkpoint may also recommend inference-time
refinements for its model (``'separation'``: ``{name: bool}`` for the names in ``separation_settings.REFINEMENTS``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mossformer2.config_utils import ConfigError, read_model_config, setting_changes
from mossformer2.models import MossFormer2, MossFormer2Config
from mossformer2.models.config import NAMED_CONFIGS, resolve_config
from mossformer2.separation_settings import recommended_refinements
from mossformer2.utils import atomic_torch_save, resolve_device

_LAYER_KEY = re.compile(r"^mask_net\.mdl\.intra_mdl\.mossformerM\.(?:fsmn|layers)\.(\d+)\.")
# A layer's rotary table; those of layers 1 and up are aliases of layer 0's (the official file stores them all).
_ROTARY_KEY = re.compile(r"^mask_net\.mdl\.intra_mdl\.mossformerM\.layers\.(\d+)\.rotary_pos_emb\.freqs$")
_REQUIRED = ("enc.conv1d.weight", "mask_net.conv1d_encoder.weight", "mask_net.conv1d_out.weight", "dec.weight")
# Entries that are closed-form tables: a checkpoint may omit them and we fill them in.
_COMPUTED = re.compile(r"(rotary_pos_emb\.freqs|pos_enc\.inv_freq)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# torch's wordings for a global the safe unpickler refuses: "Unsupported global: GLOBAL argparse.Namespace" and,
# for blocked modules (os, subprocess, ...), "Trying to load unsupported GLOBAL posix.system whose module ...".
_UNSAFE_GLOBAL = re.compile(r"unsupported global:? (?:GLOBAL )?([\w.]+)", re.IGNORECASE)

log = logging.getLogger(__name__)


# NumPy scalars (a third-party training script's best_loss = np.float64(...)) rebuild from bytes and a dtype, and
# run nothing: allowed in the weights-only unpickler. NumPy arrays (np.core.multiarray._reconstruct) stay refused.
_NUMPY_SCALAR = (getattr(np, "_core", None) or np.core).multiarray.scalar
_NUMPY_SCALAR_GLOBALS = [_NUMPY_SCALAR, (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"),  # as NumPy 1.x named it
                         (_NUMPY_SCALAR, "numpy._core.multiarray.scalar"), np.dtype,
                         *(type(np.dtype(name)) for name in ("float64", "float32", "float16", "int64", "int32",
                                                             "int16", "int8", "uint64", "uint32", "uint16", "uint8",
                                                             "bool", "complex64", "complex128"))]


class TorchScriptFileError(ValueError):
    """:func:`read_checkpoint` was given a TorchScript export (``torch.jit.save``), which ``torch.load`` cannot read."""


def is_torchscript_archive(path: str | Path) -> bool:
    """True for a ``torch.jit.save`` file (a zip with TorchScript code)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file safely (``weights_only=True``) onto the CPU."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a checkpoint file: pass the file inside it "
                         "(mossformer2.hub.resolve_checkpoint(folder) finds it)")
    if is_torchscript_archive(path):
        raise TorchScriptFileError(f"{path} is a TorchScript export, not a checkpoint: `mossformer2 separate` and "
                                   "Separator.from_pretrained run it when given the file, named *.ts.pt; to train "
                                   "or export again, use the checkpoint it was exported from")
    try:
        with warnings.catch_warnings():  # its note on an unusual pickle protocol asks users to file a torch issue
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            with torch.serialization.safe_globals(_NUMPY_SCALAR_GLOBALS):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the safe unpickler raises many types on garbage input
        if isinstance(err, MemoryError):
            raise
        if _looks_like_onnx(path):
            raise ValueError(f"{path} is an ONNX export, not a checkpoint: named *.onnx, `mossformer2 separate` "
                             "and Separator.from_pretrained run it (they tell ONNX files by that suffix); to train "
                             "or export again, use the checkpoint it was exported from") from None
        raise ValueError(_load_error(path, err)) from err
    damaged = _damaged_member(path)
    if damaged:  # torch.load reads stored bytes without checking them: a flipped bit loads as a wrong weight
        raise ValueError(_damaged_message(path, damaged))
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    return obj


def _damaged_member(path: Path) -> str | None:
    """Which member of a zip checkpoint fails its stored CRC-32, in words (None: all intact, or not a zip archive;
    about 0.1 s for the 223 MB full model)."""
    try:
        with zipfile.ZipFile(path) as archive:
            member = archive.testzip()
    except (zipfile.BadZipFile, OSError):
        return None
    except (zlib.error, EOFError, NotImplementedError) as err:  # a member that cannot even be read back
        return f"a member that cannot be read back ({type(err).__name__})"
    return None if member is None else f"its member {member} does not match the checksum stored with it"


def _damaged_message(path: Path, damage: str) -> str:
    return f"{path} is damaged: {damage} (a corrupted download, copy or disk?): fetch or copy the file again"


def _looks_like_onnx(path: Path) -> bool:
    """An ``.onnx`` name, or the start of a serialized ONNX ModelProto: field 1 (``ir_version``, a one-byte
    varint) then one of the fields 2-8 (producer name ... opset imports) as written by the exporters."""
    if path.suffix.lower() == ".onnx":
        return True
    with open(path, "rb") as f:
        head = f.read(3)
    return len(head) == 3 and head[0] == 0x08 and head[2] in (0x12, 0x1A, 0x22, 0x2A, 0x32, 0x3A, 0x42)


def _load_error(path: Path, err: Exception) -> str:
    """One line for a ``torch.load`` failure, without PyTorch's ANSI codes or its advice to set
    ``weights_only=False`` (which would run whatever code the file holds)."""
    text = _ANSI.sub("", str(err))
    if "Weights only load failed" in text:
        unsafe = _UNSAFE_GLOBAL.search(text)
        if unsafe:
            return (f"{path}: not a plain tensor checkpoint: it holds Python objects that could run code "
                    f"({unsafe.group(1)}); refusing to load it")
        detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else ""
        text = next((line.strip() for line in detail.splitlines() if line.strip()), "unreadable pickle data")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return f"{path} is empty (0 bytes): not a checkpoint (an interrupted download or copy?)"
    if head.startswith(b"version https://git-lfs"):
        return f"{path} is a Git LFS pointer, not the checkpoint itself: fetch the file (git lfs pull)"
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # torch.save: a zip, or a legacy pickle
        return f"{path} is not a PyTorch checkpoint: torch.save writes a zip archive (or a pickle), and this is neither"
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):  # the zip's directory is at its end
        return (f"{path} is truncated or damaged: its zip archive has no readable end (an interrupted download or "
                "copy?)")
    damaged = _damaged_member(path)
    if damaged:
        return _damaged_message(path, damaged)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}{': ' + first if first else ''})"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP / DataParallel, torch.compile, a wrapper module


def extract_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of a container (``'model'`` / ``'state_dict'`` key) or a bare state dict, with any
    ``module.`` (DDP), ``_orig_mod.`` (torch.compile) or ``model.`` (wrapper) prefixes removed, nested or not."""
    state = checkpoint
    for key in ("model", "state_dict", "model_state_dict"):
        if key in checkpoint and _is_state_dict(checkpoint[key]):
            state = checkpoint[key]
            break
    if not _is_state_dict(state):
        raise ValueError(
            "not a model checkpoint: expected a state dict or a dict with a 'model' state dict; found keys "
            f"{sorted(map(str, checkpoint))[:8]}"
        )
    # Wrappers nest (DDP around torch.compile, a Lightning module's "model." around either): peel them all.
    while prefix := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None):
        state = {k[len(prefix):]: v for k, v in state.items()}
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(
            f"not a MossFormer2 checkpoint: missing {missing}; it has keys like {sorted(state)[:5]}"
        )
    return state


def infer_config(state: dict[str, torch.Tensor], base: MossFormer2Config | None = None) -> MossFormer2Config:
    """Rebuild the config from tensor shapes (width, depth, kernel, speakers and the internal sizes).

    ``group_size`` and ``dropout`` leave no trace in the weights; they come from ``base`` (default: official).
    """
    base = base or MossFormer2Config()
    try:
        E, _, K = state["enc.conv1d.weight"].shape
        D = state["mask_net.conv1d_encoder.weight"].shape[0]
        S = state["mask_net.conv1d_out.weight"].shape[0] // D
        indices = [int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))]
        L = max(indices) + 1 if indices else 0
        p = "mask_net.mdl.intra_mdl.mossformerM."
        values: dict[str, Any] = dict(encoder_embedding_dim=int(E), mossformer_sequence_dim=int(D),
                                      num_mossformer_layer=int(L), encoder_kernel_size=int(K), num_spks=int(S))
        if f"{p}fsmn.0.conv1.0.weight" in state:
            values["fsmn_inner_dim"] = int(state[f"{p}fsmn.0.conv1.0.weight"].shape[0])
            values["fsmn_lorder"] = (int(state[f"{p}fsmn.0.gated_fsmn.fsmn.conv.conv1.weight"].shape[2]) + 1) // 2
        if f"{p}layers.0.to_qk.mdl.1.weight" in state:
            values["query_key_dim"] = int(state[f"{p}layers.0.to_qk.mdl.1.weight"].shape[0])
            values["expansion_factor"] = state[f"{p}layers.0.to_hidden.mdl.1.weight"].shape[0] / D
            values["conv_kernel_size"] = int(state[f"{p}layers.0.to_qk.mdl.3.sequential.1.conv.weight"].shape[-1])
        freqs = next((v for k, v in state.items() if _ROTARY_KEY.match(k)), None)  # any layer's alias
        values["rotary_dim"] = (2 * int(freqs.shape[0]) if freqs is not None
                                else min(base.rotary_dim, values.get("query_key_dim", base.query_key_dim)))
    except (KeyError, IndexError) as err:
        raise ValueError(f"cannot infer the MossFormer2 configuration from this checkpoint: missing {err}") from err
    if L == 0:
        raise ValueError("cannot infer the MossFormer2 configuration: the checkpoint has no MossFormer layers")
    try:
        return base.replace(**values)
    except ConfigError as err:
        raise ValueError(f"checkpoint shapes do not form a valid MossFormer2 configuration: {err}") from err


def _config_from_checkpoint(checkpoint: dict[str, Any]) -> MossFormer2Config | None:
    raw = checkpoint.get("config")
    if isinstance(raw, dict):
        model_section = raw.get("model", raw) if isinstance(raw.get("model"), dict) else raw
        if not set(MossFormer2Config.__dataclass_fields__) & set(model_section):
            # Another training script's settings (vars(args): lr, batch_size, ...), not a model config: the
            # weights are still good, and their shapes give the sizes.
            log.info("the checkpoint's 'config' entry is not a MossFormer2 config (keys like %s): ignored",
                     sorted(map(str, model_section))[:5])
            return None
        try:
            return MossFormer2Config.from_dict(model_section)
        except ConfigError as err:
            raise ValueError(f"the checkpoint's embedded config is invalid: {err}") from err
    return None


# What a state dict's tensor shapes cannot tell (infer_config assumes the official values).
_NOT_IN_SHAPES = ("sample_rate", "group_size", "dropout")


def _described(changes: list[tuple[str, Any, Any]]) -> str:
    """``group_size 128 -> 256; ...`` for :func:`~mossformer2.config_utils.setting_changes`' triples."""
    return "; ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)


def _list(items: list[str], limit: int = 10) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_state_dict_strict(model: MossFormer2, state: dict[str, torch.Tensor]) -> None:
    """Load weights, failing with a message that names every missing, unexpected or mis-shaped key.

    Closed-form tables (rotary ``freqs`` aliases, ``pos_enc.inv_freq``) may be absent: they keep their
    computed values.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not _COMPUTED.search(k)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} (checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)})"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_list(mismatched)}")
    if problems:
        raise ValueError("checkpoint does not match the MossFormer2 architecture; " + "; ".join(problems))
    merged = {k: state.get(k, v) for k, v in expected.items()}
    with torch.no_grad():
        model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in merged.items()})


def moving_average_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The averaged weights of a training state that kept a moving average (the trainer's ``last.pt`` with
    ``trainer.ema_decay``: ``'ema'`` is ``AveragedModel.state_dict()``, the network under ``module.`` plus an
    ``n_averaged`` counter), or None."""
    average = checkpoint.get("ema")
    if not isinstance(average, dict):
        return None
    state = {key.removeprefix("module."): value for key, value in average.items()
             if isinstance(key, str) and key.startswith("module.") and isinstance(value, torch.Tensor)}
    return state or None


WeightsChoice = Literal["auto", "average", "model"]


def select_weights(checkpoint: dict[str, Any], weights: WeightsChoice = "auto") -> tuple[dict[str, Any], str]:
    """The checkpoint to build the model from and which of its weights those are.

    A training state with a moving average holds two sets: ``'model'`` (the raw weights, to resume from) and
    ``'ema'`` (the average, what validation scored and ``best.pt`` holds). ``"auto"`` takes the average where
    there is one, ``"model"`` always the raw weights, ``"average"`` requires the average.
    """
    if weights not in ("auto", "average", "model"):
        raise ValueError(f"weights must be 'auto', 'average' or 'model', got {weights!r}")
    average = moving_average_weights(checkpoint) if weights != "model" else None
    if average is None:
        if weights == "average":
            raise ValueError("the checkpoint holds no moving average ('ema'): its weights are in 'model'")
        return checkpoint, "model"
    updates = checkpoint["ema"].get("n_averaged")
    count = f", {int(updates)} updates" if isinstance(updates, torch.Tensor) and updates.numel() == 1 else ""
    return {**checkpoint, "model": average}, f"moving average ('ema'{count})"


def load_model(checkpoint: str | Path | dict[str, Any], config: MossFormer2Config | str | Path | None = None,
               device: str | torch.device = "cpu", weights: WeightsChoice = "auto", *,
               source: str | Path | None = None) -> MossFormer2:
    """Build a MossFormer2 from a checkpoint and return it in eval mode on ``device``.

    ``checkpoint``: a dict, a file, a folder (``hub.resolve_checkpoint`` picks its file), a hub id
    (``alibabasglab/MossFormer2_SS_16K``, downloaded or taken from the local cache) or a model name (``"default"``:
    the built-in model; ``"MossFormer2_SS_16K"``).

    Accepts the official container, our checkpoints (config embedded), or a bare state dict; keys with or without
    ``module.``; with or without the rotary aliases. Without ``config`` the architecture is read from the
    checkpoint (embedded config, else tensor shapes; then ``sample_rate``, ``group_size`` and ``dropout`` are the
    official values, logged at INFO). ``config``: a config, a name (``"MossFormer2-S"``) or a YAML file
    (:func:`~mossformer2.config_utils.read_model_config`); where it differs from the checkpoint's embedded config it
    wins, with a warning naming the differences (dropout aside: fine-tuning changes it on purpose). A checkpoint of
    another architecture raises ValueError. ``source``: the file a checkpoint given as a dict was read from, for
    messages.
    A training state that kept a moving average loads the average by default (see :func:`select_weights`).
    The checkpoint's recommended refinements (``'separation'``) become ``model.separation_settings``, which
    ``Separator(model)``, :func:`save_checkpoint` and ``mossformer2.export`` read.
    """
    if isinstance(checkpoint, (str, Path)):
        from mossformer2.hub import checkpoint_path

        checkpoint = checkpoint_path(checkpoint)
    source = source or (checkpoint if isinstance(checkpoint, Path) else "checkpoint")
    obj = read_checkpoint(checkpoint) if isinstance(checkpoint, Path) else checkpoint
    if not isinstance(obj, dict):
        raise ValueError(f"expected a checkpoint path or dict, got {type(obj).__name__}")
    obj, chosen = select_weights(obj, weights)
    if chosen != "model" and weights == "auto":
        where = f" of {checkpoint}" if isinstance(checkpoint, (str, Path)) else ""
        log.info("using the %s%s, the weights validation scored (its raw weights: weights='model')", chosen, where)
    state = extract_state_dict(obj)
    misfit = ""  # why a given config may not fit: how it differs from the stored one, or from the tensor shapes
    overridden: list[tuple[str, Any, Any]] = []  # stored settings the given config changes (a warning once loaded)
    if config is not None:
        cfg = read_model_config(config) if isinstance(config, (str, os.PathLike)) else resolve_config(config)
        saved = None if _is_state_dict(obj) else obj.get("config")
        saved = saved.get("model", saved) if isinstance(saved, dict) else None
        if isinstance(saved, dict):
            changes = setting_changes(saved, cfg.to_dict(), shared_only=True)
            misfit = f"which was saved with its own ({_described(changes)}): leave it out to use the stored one"
            overridden = [change for change in changes if change[0] != "dropout"]  # (fine-tuning changes it)
        else:
            with contextlib.suppress(ValueError):  # (shapes that form no config: the key list says it)
                shapes = {k: v for k, v in infer_config(state).to_dict().items() if k not in _NOT_IN_SHAPES}
                changes = setting_changes(shapes, cfg.to_dict(), shared_only=True)
                misfit = f"whose tensor shapes say otherwise ({_described(changes)})" if changes else ""
        model = MossFormer2(cfg)
    else:
        cfg = _config_from_checkpoint(obj)
        if cfg is None:
            cfg = infer_config(state)
            # Without a rotary table rotary_dim leaves no trace either: the official rule min(32, query_key_dim).
            rotary = "" if any(map(_ROTARY_KEY.match, state)) else f", rotary_dim={cfg.rotary_dim}"
            assumed = (f"{source} has no embedded config: sizes read from its tensor shapes; assumed sample_rate="
                       f"{cfg.sample_rate}, group_size={cfg.group_size}, dropout={cfg.dropout:g}{rotary} (official "
                       "values): pass config= if the model was trained otherwise")
            if cfg in NAMED_CONFIGS.values():  # an official size (the released file has no config): as expected
                log.info(assumed)
            else:  # a size of someone's own: its group size may well differ, which changes the output a little
                warnings.warn(assumed, stacklevel=2)
        model = MossFormer2(cfg)
    try:
        load_state_dict_strict(model, state)
    except ValueError as err:
        if misfit:  # the cause, before a list of hundreds of keys
            raise ValueError(f"the given model config (config=, --model-config) does not fit {source}, {misfit}; "
                             f"{err}") from None
        raise
    if overridden:
        warnings.warn(f"{source}: the given model config overrides the one it was saved with: "
                      f"{_described(overridden)}", stacklevel=2)
    model.separation_settings = recommended_refinements(None if _is_state_dict(obj) else obj.get("separation"),
                                                        source)
    return model.to(resolve_device(device)).eval()


# What ``torch.load(weights_only=True)`` reads back, checked before writing (exact types: subclasses such as
# IntEnum, namedtuple or a numpy scalar are pickled as their own class, which the safe loader refuses).
_PLAIN_VALUES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
_PLAIN_CONTAINERS = (dict, OrderedDict, list, tuple)


def _plain(value: Any, where: str) -> Any:
    """``value`` with numpy scalars as Python numbers and numpy arrays as tensors; ValueError naming ``where``
    for anything else the safe loader would refuse."""
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN_VALUES:
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biufcU":
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        return torch.from_numpy(np.array(value))  # a copy: the checkpoint does not share the caller's buffer
    if type(value) in _PLAIN_CONTAINERS:
        if isinstance(value, dict):
            return type(value)((_plain(k, f"{where} key {k!r}"), _plain(v, f"{where}[{k!r}]"))
                               for k, v in value.items())
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise ValueError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which a checkpoint cannot "
                     "hold: store tensors, numbers, strings, bools, None and lists/tuples/dicts of them "
                     "(e.g. str() a path, float() a metric)")


def _unwrap(model: Any) -> Any:
    """The network inside DataParallel/DDP (``module``) and ``torch.compile`` (``_orig_mod``) wrappers."""
    while isinstance(getattr(model, "module", None), torch.nn.Module) or isinstance(
            getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model._orig_mod
    return model


def save_checkpoint(path: str | Path, model: MossFormer2, optimizer: torch.optim.Optimizer | None = None,
                    epoch: int = 0, step: int = 0, extra: dict[str, Any] | None = None) -> Path:
    """Write ``{'model', 'config', 'epoch', 'step'[, 'optimizer'][, 'separation'], **extra}`` atomically.

    The layout is the official one plus ``'config'``, so ClearVoice's loader reads the weights too. ``model`` may
    be wrapped (DataParallel/DDP, ``torch.compile``). Its ``separation_settings`` (see :func:`load_model`) are
    written as ``'separation'`` unless ``extra`` has that key. ``extra`` holds what :func:`load_model` can read
    back: tensors, numbers, strings, bools, None and lists/tuples/dicts of them (numpy scalars become numbers,
    numpy arrays tensors); anything else is a ValueError naming the key, before anything is written.
    """
    inner = _unwrap(model)
    if not isinstance(inner, MossFormer2):
        raise ValueError(f"save_checkpoint expects a MossFormer2 model, got {type(inner).__name__}")
    payload: dict[str, Any] = {
        "model": {k: v.detach().cpu() for k, v in inner.state_dict().items()},
        "config": inner.config.to_dict(),
        "epoch": int(epoch),
        "step": int(step),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    extra = dict(extra or {})
    clash = set(extra) & set(payload)
    if clash:
        raise ValueError(f"extra keys {sorted(clash)} would overwrite checkpoint fields")
    # Read back by load_model: checked as it will be there, and written as checked (unknown names dropped).
    given = "separation" in extra
    settings = recommended_refinements(extra["separation"] if given else getattr(inner, "separation_settings", None),
                                       "extra['separation']" if given else "model.separation_settings")
    if settings or given:
        extra["separation"] = settings
    payload.update(_plain(extra, "extra"))
    atomic_torch_save(payload, path)
    return Path(path)


def checkpoint_summary(path: str | Path, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``mossformer2 info --checkpoint`` prints: container keys, epoch/step, tensors, inferred config.

    ``checkpoint``: the file's contents if already read (``read_checkpoint``), so that it is not read twice."""
    obj = read_checkpoint(path) if checkpoint is None else checkpoint
    state = extract_state_dict(obj)
    embedded = _config_from_checkpoint(obj)
    config = embedded or infer_config(state)
    unique = {v.data_ptr(): v.numel() for v in state.values()}
    return {
        "path": str(path),
        "container_keys": [] if _is_state_dict(obj) else sorted(map(str, obj)),  # [] for a bare state dict
        "epoch": obj.get("epoch"),
        "step": obj.get("step"),
        "has_optimizer_state": "optimizer" in obj,
        "num_tensors": len(state),
        "num_rotary_aliases": sum(1 for k in state if (m := _ROTARY_KEY.match(k)) and m.group(1) != "0"),
        "num_elements": sum(unique.values()),
        "config": config,
        # Without an embedded config, the sizes come from tensor shapes; group_size and dropout leave no trace in
        # the weights, so they are the official values, assumed.
        "config_inferred": embedded is None,
        "separation": recommended_refinements(obj.get("separation"), path),
        "weights": select_weights(obj)[1],  # the set load_model uses: "model", or the moving average
        "validation": _validation_summary(obj),
    }


def _validation_summary(checkpoint: dict[str, Any]) -> str | None:
    """What a training checkpoint says of validation: a ``best.pt`` its own scores (``'valid'``, one epoch of the
    history), a ``last.pt`` the best epoch so far (``'trainer_state'``); None for other files."""
    valid, trainer_state = checkpoint.get("valid"), checkpoint.get("trainer_state")
    if isinstance(valid, dict) and "valid_si_sdri" in valid:
        return (f"SI-SDRi {float(valid['valid_si_sdri']):.2f} dB, SI-SDR {float(valid.get('valid_si_sdr', 0.0)):.2f} "
                f"dB (epoch {int(valid.get('epoch', -1))}, counting from 0; step {int(valid.get('step', -1))})")
    if isinstance(trainer_state, dict) and "best_epoch" in trainer_state:
        done = f"{int(trainer_state.get('epoch', 0))} epochs completed"
        if int(trainer_state["best_epoch"]) < 0:
            return f"{done}, none validated yet"
        return (f"{done}; best SI-SDRi {float(trainer_state['best_metric']):.2f} dB at epoch "
                f"{int(trainer_state['best_epoch'])} (counting from 0)")
    return None

"""Typed dataclass configs loaded from dicts / YAML, with clear errors for unknown or wrong keys.

Shared by the model config, the training config and anything else that is configured from YAML.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

if TYPE_CHECKING:
    from mossformer2.models.config import MossFormer2Config

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _same_shape(value: Any, tp: Any) -> bool:
    """``value`` is a mapping and ``tp`` a dataclass or dict, or both are lists."""
    origin = typing.get_origin(tp)
    if isinstance(value, dict):
        return dataclasses.is_dataclass(tp) or origin is dict
    return isinstance(value, (list, tuple)) and origin in (list, tuple)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, args, where)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} ({value!r})")
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        val_tp = args[1] if len(args) == 2 else Any
        return {k: _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if tp in _SCALARS:
        return _SCALARS[tp](value, tp, where)
    return value


def _convert_union(value: Any, args: tuple[Any, ...], where: str) -> Any:
    """``value`` as the first member of an ``X | Y | None`` that takes it."""
    if value is None and type(None) in args:
        return None
    errors: list[tuple[Any, ConfigError]] = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, where)
        except ConfigError as err:
            errors.append((arg, err))
    # The member the value was meant for (the only one, or the only one of its shape: a mapping for a
    # section, a list for a list) knows what is wrong inside it, e.g. an unknown key in a nested section.
    meant = [err for arg, err in errors if len(errors) == 1 or _same_shape(value, arg)]
    if len(meant) == 1:
        raise meant[0]
    details = "; ".join(str(err).removeprefix(f"{where}: ") for _, err in errors)
    raise ConfigError(f"{where}: {value!r} does not match any of {[_type_name(a) for a in args]} ({details})")


def _to_bool(value: Any, _tp: type, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ConfigError(f"{where}: expected true/false, got {value!r}")


def _to_number(value: Any, tp: type, where: str) -> int | float:
    """An int (also from a whole float or a numeral) or a float (also from an int or a numeral); never a bool."""
    if not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, float) and (tp is float or value.is_integer())):
            return tp(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return tp(value)
    noun = "an integer" if tp is int else "a number"
    raise ConfigError(f"{where}: expected {noun}, got {value!r}{_null_hint(value)}")


def _to_str(value: Any, _tp: type, where: str) -> str:
    if isinstance(value, (str, Path)):
        return str(value)
    raise ConfigError(f"{where}: expected a string, got {value!r}")


_SCALARS: dict[type, Callable[[Any, type, str], Any]] = {bool: _to_bool, int: _to_number, float: _to_number,
                                                          str: _to_str}


def _null_hint(value: Any) -> str:
    """For a value that reads as "nothing": how YAML and key=value overrides spell it."""
    if isinstance(value, str) and value.strip().lower() in ("none", "nil", ""):
        return " (where a setting may be empty, write null: key=null)"
    return ""


def from_dict(cls: type[T], data: dict[str, Any], where: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrongly typed values raise ConfigError."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(fields)}"
        )
    kwargs = {name: _convert(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # missing required field
        raise ConfigError(f"{where}: {err}") from err


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain dict (tuples become lists so that YAML stays readable)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(obj)


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A mapping sets the same key twice (PyYAML would silently keep the last value)."""

    def __init__(self, key: Any, line: int, first_line: int, mark: Any) -> None:
        super().__init__(problem=f"duplicate key {key!r}", problem_mark=mark)
        self.key, self.line, self.first_line = key, line, first_line

    def __str__(self) -> str:
        return f"line {self.line}: duplicate key {self.key!r} (already set on line {self.first_line})"


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key set twice in one mapping (merge keys ``<<`` may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise DuplicateKeyError(key, line, seen[key], key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def safe_load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises :class:`DuplicateKeyError` for a key set twice in one mapping."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a dict; a missing file, invalid YAML, a duplicate key or a non-mapping top level
    raises :class:`ConfigError` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder: give the YAML file (e.g. a file in configs/)")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = safe_load_yaml(path.read_text()) or {}
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def save_yaml(obj: Any, path: str | Path) -> None:
    """Write a dataclass (or dict) as YAML atomically."""
    from mossformer2.utils import atomic_write_text

    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars) to a nested dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = safe_load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"command-line override {item!r}: the value is not valid YAML: "
                              f"{' '.join(str(err).split())}") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


class _NotSet:
    """A key one side of :func:`setting_changes` lacks (shown as ``(not set)``, unquoted)."""

    def __repr__(self) -> str:
        return "(not set)"


NOT_SET = _NotSet()


def setting_changes(old: dict[str, Any] | None, new: dict[str, Any] | None, prefix: str = "",
                    shared_only: bool = False) -> list[tuple[str, Any, Any]]:
    """``[(dotted key, old value, new value), ...]`` for the settings that differ between two config dicts, nested
    sections by their dotted names (``data.dynamic_mixing.gain_db``), sorted by key. A key on one side only
    shows :data:`NOT_SET` on the other; ``shared_only``: only keys both sides hold (e.g. a part of a config
    against a saved one that predates some options)."""
    old, new = old or {}, new or {}  # a missing section: every setting of the other side changed
    changes = []
    keys = set(old) & set(new) if shared_only else set(old) | set(new)
    for key in sorted(keys, key=str):
        before, after = old.get(key, NOT_SET), new.get(key, NOT_SET)
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changes += setting_changes(before, after, name, shared_only)
        elif before != after:
            changes.append((name, before, after))
    return changes


def model_config_from_section(data: Any) -> MossFormer2Config:
    """A config's ``model`` mapping -> :class:`~mossformer2.models.config.MossFormer2Config`; a ``name`` key selects a
    preset (``MossFormer2``, ``MossFormer2-S``) that the other keys override."""
    from mossformer2.models.config import MossFormer2Config, get_config

    if isinstance(data, MossFormer2Config):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"model: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    name = data.pop("name", None)
    try:
        base = to_dict(get_config(str(name))) if name else {}
    except ValueError as err:  # an unknown preset name
        raise ConfigError(f"model.name: {err}") from err
    return from_dict(MossFormer2Config, {**base, **data}, "model")


def read_model_config(spec: str | Path) -> MossFormer2Config:
    """The architecture ``spec`` names: a named config (``MossFormer2``, ``MossFormer2-S``) or a YAML file holding
    :class:`~mossformer2.models.config.MossFormer2Config` fields (and ``name:`` for a preset they change), at its
    top level or in a ``model:`` section (a training config, read as training reads it): ``--model-config``, for
    checkpoints saved without a config whose sample rate, group size or rotary size is not the official one (their
    tensor shapes cannot tell)."""
    from mossformer2.models.config import NAMED_CONFIGS, get_config

    spec = str(spec)
    if not spec.lower().endswith((".yaml", ".yml", ".json")):  # (JSON is YAML)
        try:
            return get_config(spec)
        except ValueError:
            raise ConfigError(f"model config {spec!r}: neither a known name ({', '.join(sorted(NAMED_CONFIGS))}) "
                              "nor a .yaml / .yml / .json file") from None
    data = load_yaml(spec)
    try:
        return model_config_from_section(data["model"] if "model" in data else data)
    except ConfigError as err:
        raise ConfigError(f"{spec}: {err}") from None

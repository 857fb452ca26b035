"""The one validator: typed dataclasses built from YAML-like data, for run configs and method knobs.

Every configurable value in raykd is a dataclass field. A field declares its valid values in its
metadata, ``{"range": (lo, hi)}`` (inclusive, ``None`` for an open end) or ``{"choices": [...]}``
(``Literal`` types work too), with :func:`bounded` or :func:`knob`. :func:`from_dict` builds a
dataclass from a nested dict, converting each value to its field's type and refusing unknown keys;
:func:`validate` checks ranges, choices and ``validate(where)`` hooks. Both raise
:class:`ConfigError` naming the file, the dotted key and the valid values.

:class:`Knobs` is the frozen base of a method's ``Params``: it converts and checks its fields the
same way when it is constructed, so a method never sees a value the config loader would refuse.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from raykd.registry import did_you_mean

C = TypeVar("C")


class ConfigError(ValueError):
    """A user error in a config file, an override or a method's parameters."""


def bounded(lo: float | None, hi: float | None) -> dict:
    """Field metadata for an inclusive range; ``None`` leaves that end open."""
    return {"range": (lo, hi)}


def knob(default: Any, *, range: tuple[float, float] | None = None, choices: list | None = None,
         help: str = "") -> Any:
    """A :class:`Knobs` field: its default, its valid ``range`` (inclusive) or ``choices``, and help."""
    if (range is None) == (choices is None):
        raise TypeError("knob() takes exactly one of range= or choices=")
    meta: dict[str, Any] = {"help": help}
    if range is not None:
        meta["range"] = (range[0], range[1])
    else:
        meta["choices"] = list(choices)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_yaml_mapping(path: str | Path) -> dict:
    """The top-level mapping of a YAML file (``{}`` for an empty file), or a :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(loaded).__name__}")
    return loaded


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> C:
    """Build a ``cls`` from defaults, then the YAML file at ``path``, then ``key=value`` overrides."""
    where = str(path) if path else "<defaults>"
    raw = read_yaml_mapping(path) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    cfg = from_dict(cls, raw, where=where)
    validate(cfg, where=where)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``key = "a.b.c"``, creating (or replacing non-dict) levels."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


# --------------------------------------------------------------------------------------------------
# Building and checking
# --------------------------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[C], raw: Any, *, where: str = "<defaults>", prefix: str = "") -> C:
    """Build dataclass ``cls`` from a nested dict, converting and checking every value."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            hint = did_you_mean(key, fields, n=1, prefix=prefix)
            raise ConfigError(
                f"{where}: unknown key {dotted!r}.{hint} Valid keys here: {', '.join(sorted(fields))}"
            )
        kwargs[key] = convert(_hints(cls)[key], value, fields[key], where=where, key=dotted)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def convert(tp: Any, value: Any, f: dataclasses.Field | None, *, where: str, key: str) -> Any:
    """``value`` as type ``tp`` (the field ``f``'s annotation), or a :class:`ConfigError`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(tp, args, value, f, where=where, key=key)
    if f is not None and f.metadata.get("typed_by"):
        return value  # its type depends on a sibling field: the dataclass resolves it
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=where, prefix=f"{key}.")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key}={value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [convert(inner, v, None, where=where, key=f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    scalar = _SCALARS.get(tp)
    return value if scalar is None else scalar(value, where, key)


def _convert_union(tp: Any, args: tuple, value: Any, f, *, where: str, key: str) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for a in (a for a in args if a is not type(None)):
        try:
            return convert(a, value, f, where=where, key=key)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {key}={value!r} matches none of {tp}")


def _to_bool(value: Any, where: str, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")


def _to_int(value: Any, where: str, key: str) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    return value


def _to_float(value: Any, where: str, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: {key} must be a number, got {value!r}")


def _to_str(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
    return value


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def check_value(f: dataclasses.Field, value: Any, *, where: str, key: str) -> None:
    """Refuse ``value`` when it lies outside the field's declared range or choices."""
    rng = f.metadata.get("range")
    if rng is not None and value is not None:
        lo, hi = rng
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            lo_s = "-inf" if lo is None else f"{lo:g}"
            hi_s = "inf" if hi is None else f"{hi:g}"
            raise ConfigError(f"{where}: {key}={value!r} is out of range [{lo_s}, {hi_s}]")
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {key}={value!r} is not one of {', '.join(map(repr, choices))}")


def validate(cfg: Any, *, where: str = "<defaults>", prefix: str = "") -> None:
    """Check ranges and choices declared in field metadata, recursively, then ``validate()`` hooks."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, where=where, prefix=f"{key}.")
            continue
        check_value(f, value, where=where, key=key)
    hook = getattr(cfg, "validate", None)
    if callable(hook):
        hook(where)


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (written next to every run)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------------------------------
# Method knobs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Knobs:
    """Base of a method's frozen ``Params``: every field is converted and checked on construction."""

    def __post_init__(self) -> None:
        where = type(self).__name__
        for f in dataclasses.fields(self):
            value = convert(_hints(type(self))[f.name], getattr(self, f.name), f, where=where, key=f.name)
            check_value(f, value, where=where, key=f.name)
            object.__setattr__(self, f.name, value)


def make_knobs(cls: type[Knobs], values: Any, *, owner: str) -> Knobs:
    """A validated ``cls`` from ``None`` (its defaults), a mapping of its fields or an instance;
    errors name ``owner`` (e.g. ``method 'kd'``)."""
    if values is None:
        return cls()
    if isinstance(values, cls):
        return values
    if isinstance(values, Knobs):
        raise ConfigError(f"{owner} takes {cls.__name__}, got {type(values).__name__}")
    if not isinstance(values, Mapping):
        raise ConfigError(f"{owner}: params must be a mapping or {cls.__name__}, got {type(values).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"{owner}: unknown parameter(s) {unknown}; valid parameters are {valid}")
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{owner}: {e}") from None

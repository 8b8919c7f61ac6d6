"""Typed configuration: dataclasses with declared ranges, built from plain dicts.

Every layer declares its config as a dataclass whose fields are made with `param(...)`. `build`
turns a dict (parsed YAML, dotted overrides, a Ray `train_loop_config`) into that dataclass and
raises `ConfigError` naming the dotted key, the bad value and what would be valid, so a bad value
fails before any Ray resource is asked for. Plain Python only: every layer may import it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Iterable, Union


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range; the message names the key."""


def param(default: Any = dataclasses.MISSING, *, gt=None, ge=None, lt=None, le=None,
          choices: Iterable | Callable[[], Iterable] | None = None, tunable: bool = False,
          help: str = "", default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its valid range; `tunable` marks a hyperparameter worth sweeping."""
    meta = {"gt": gt, "ge": ge, "lt": lt, "le": le, "choices": choices, "tunable": tunable,
            "help": help}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _choices(meta: dict) -> list | None:
    c = meta.get("choices")
    if c is None:
        return None
    return list(c() if callable(c) else c)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return build(tp, value, prefix=key)
    elif origin in (list, tuple):
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
                return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            item = args[0] if args else Any
            out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(out) if origin is tuple else out
    elif origin is dict:
        if isinstance(value, dict):
            key_tp, value_tp = typing.get_args(tp) or (Any, Any)
            return {_coerce(k, key_tp, f"{key}.{k}"): _coerce(v, value_tp, f"{key}.{k}")
                    for k, v in value.items()}
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def check_range(key: str, value: Any, meta: dict) -> None:
    """Raise ConfigError when `value` is outside the bounds or choices declared in `meta`."""
    choices = _choices(meta)
    values = value if isinstance(value, (list, tuple)) and choices is not None else [value]
    for v in values:
        if choices is not None and v is not None and v not in choices:
            raise ConfigError(f"{key}: {v!r} is not one of {', '.join(map(str, choices))}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for bound, ok, words in (("gt", lambda v, b: v > b, "> "), ("ge", lambda v, b: v >= b, ">= "),
                             ("lt", lambda v, b: v < b, "< "), ("le", lambda v, b: v <= b, "<= ")):
        b = meta.get(bound)
        if b is not None and not ok(value, b):
            raise ConfigError(f"{key}: {value!r} is out of range; it must be {words}{b}")


def build(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, naming the dotted key of any bad value."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; valid keys under "
                          f"{prefix or 'the top level'}: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
        check_range(key, kwargs[name], fields[name].metadata)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        missing = [n for n, f in fields.items() if n not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"{prefix or 'config'}: missing required key(s) {', '.join(missing)}") from e
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain dicts and lists, the form YAML and Ray carry."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def tunables(cls: type) -> dict[str, Any]:
    """The fields of `cls` marked tunable, with their defaults."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("tunable"):
            out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


def describe(cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, range words) for each field of `cls`, for help output."""
    rows = []
    for f in dataclasses.fields(cls):
        m = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        words = [f"{w}{m[b]}" for b, w in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
                 if m.get(b) is not None]
        if _choices(m):
            words.append("|".join(map(str, _choices(m))))
        rows.append((f.name, default, " ".join(words)))
    return rows

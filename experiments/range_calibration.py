"""Range calibration: static activation scales (and, optionally, MSE-clipped weights) for quantized ops.

After a `quantize` step in qat (or calibrate) mode has wrapped the ops, `calibrate` measures the input of
every matched op whose rule has static activation scales, on the calibration batches, and sets its
`act_scale` from a range:

  minmax / absmax: the running [min, max] (or ±max|x|), per tensor or per feature as the rule's static
    activation spec says (`calibration.stat_shape`);
  ema: each batch's [min, max], averaged exponentially over batches (`ema_decay` weighs the new batch);
  percentile / mse / kl: an abs-max pass, then a per-tensor histogram of |x| over [0, amax] turned into a
    threshold t by `qjax.numerics.ranges` (percentile_range, mse_range, kl_range): the range [-t, t].

Every range becomes a scale (and zero point) through `scale_from_range`, the rule all scales come from.
An op with an online input transform is observed on the transformed input, which is what it quantizes
(`stats.collect` taps a module's call argument, so each op is wrapped in an `_Observed` view whose probe,
`<op>.quantized_input`, sees the transformed value). Statistics come from the model as it arrives: in qat mode the earlier ops are
fake-quantized (each op sees what it will see once deployed), in calibrate mode the forward is float.
`weights: mse` packs every matched weight with a per-tile MSE-optimal clip (`mse_clip_search`) instead of
the spec's abs-max range. Finally every op is converted to `mode`.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from flax import nnx

import qjax
from qjax.experiments import stats
from qjax.experiments.schema import check_regex
from qjax.experiments.pipeline import Context, register
from qjax.numerics import QArray, QuantSpec, quantize
from qjax.numerics import ranges as R
from qjax.numerics.quantize import scale_from_range
from qjax.transforms import calibration
from qjax.transforms.nnx_modules import QEmbed, QuantizedOp, StaticScale, set_child
from qjax.transforms.nnx_quantize import path_str
from qjax.transforms.recipe import MODES

METHODS = ("minmax", "absmax", "percentile", "mse", "kl", "ema")
HISTOGRAM_METHODS = ("percentile", "mse", "kl")
WEIGHTS = ("absmax", "mse")
PROBE = ".quantized_input"  # the probe's path under an op: what collect's errors name


@dataclasses.dataclass
class CalibrateConfig:
    """method: the activation range rule (METHODS); percentile: % of the |x| mass kept (percentile);
    bins: histogram bins (percentile/mse/kl); ema_decay: weight of each new batch (ema);
    weights: "absmax" (the weight spec's own range) or "mse" (per-tile MSE-optimal clip, packed here);
    pattern: regex (fullmatch) on op paths; mode: the mode every op is converted to afterwards."""

    method: str = "minmax"
    percentile: float = 99.99
    bins: int = 2048
    ema_decay: float = 0.01
    weights: str = "absmax"
    pattern: str = ".*"
    mode: str = "ptq"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"calibrate: method must be one of {METHODS}, got {self.method!r}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"calibrate: percentile must be in (0, 100], got {self.percentile}")
        if self.bins < 16:
            raise ValueError(f"calibrate: bins must be at least 16, got {self.bins}")
        if not 0 < self.ema_decay <= 1:
            raise ValueError(f"calibrate: ema_decay must be in (0, 1], got {self.ema_decay}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"calibrate: weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.mode not in MODES:
            raise ValueError(f"calibrate: mode must be one of {MODES}, got {self.mode!r}")
        if self.weights == "mse" and self.mode not in ("ptq", "serve"):
            raise ValueError(f"calibrate: weights='mse' packs the weights, so mode must be 'ptq' or 'serve', got {self.mode!r}")
        check_regex(self.pattern, "calibrate: pattern")


class _Probe(nnx.Module):
    """Identity: where `stats.collect` taps the value an op quantizes."""

    def __call__(self, x):
        return x


class _Observed(nnx.Module):
    """An op whose probe sees its activation after the op's online input transform."""

    def __init__(self, op: QuantizedOp):
        self.op, self.quantized_input = op, _Probe()

    def _see(self, x) -> None:
        t = self.op.input_transform
        self.quantized_input(x if t is None else t.get_value().apply(x))

    def __call__(self, x, *args, **kwargs):
        if not isinstance(self.op, QEmbed):  # an embedding's activation is the tied head's input (attend)
            self._see(x)
        return self.op(x, *args, **kwargs)

    def attend(self, query):
        self._see(query)
        return self.op.attend(query)


def _observed_view(model, paths: set[str]):
    """A copy of `model` with the ops at `paths` wrapped in `_Observed` (probes at path + PROBE)."""
    view = nnx.clone(model)
    for p, m in list(nnx.iter_modules(view)):
        if path_str(p) in paths:
            set_child(view, p, _Observed(m))
    return view


def _stat_shape(path: str, op: QuantizedOp, cfg: CalibrateConfig) -> tuple[int, ...]:
    """() or (F,) for the op's static activation spec; refuses what the method cannot calibrate."""
    if getattr(op, "n_stacked", 0):
        raise ValueError(f"calibrate: {path} holds stacked (scan_layers) layers; load the model with scan_layers: false")
    try:
        shape = calibration.stat_shape(op.rule.act, op.features)
    except ValueError as e:
        raise ValueError(f"calibrate: {path}: {e}") from None
    if shape and cfg.method in HISTOGRAM_METHODS:
        raise ValueError(f"calibrate: {path} has a per-feature static activation spec, but method {cfg.method!r} "
                         "calibrates one per-tensor histogram; use minmax, absmax or ema, or a per-tensor act spec")  # fmt: skip
    if cfg.method == "kl" and R.format_levels(op.rule.act) > cfg.bins:
        raise ValueError(f"calibrate: {path}: kl needs at least {R.format_levels(op.rule.act)} bins for "
                         f"{op.rule.act.format.name}, got bins={cfg.bins}")  # fmt: skip
    return shape


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _threshold(h: R.Histogram, method: str, spec: QuantSpec, percentile: float) -> jax.Array:
    """The histogram method's threshold t (jitted: one compilation serves every op of the same spec)."""
    if method == "percentile":
        return R.percentile_range(h, percentile)
    return R.kl_range(h, spec) if method == "kl" else R.mse_range(h, spec)


def activation_ranges(model, ops: dict[str, QuantizedOp], cfg: CalibrateConfig, ctx: Context) -> dict[str, tuple]:
    """{path: (lo, hi)} of each op's (transformed) input on the calibration batches, per `cfg.method`."""
    shapes = {p: _stat_shape(p, op, cfg) for p, op in ops.items()}
    batches = ctx.calibration_batches("calibrate")
    view = _observed_view(model, set(ops))
    where = {p + PROBE for p in ops}

    def run(observer: stats.Observer, initial: dict) -> dict:
        found = stats.collect(view, batches, lambda p, m: p in where, observer, initial=initial,
                              progress=ctx.progress, desc=f"{ctx.label}: calibrate" if ctx.label else "calibrate")  # fmt: skip
        missing = sorted(set(ops) - {p.removesuffix(PROBE) for p in found})
        if missing:
            raise ValueError(f"calibrate: {', '.join(missing)} never ran on the calibration batches")
        return {p.removesuffix(PROBE): s for p, s in found.items()}

    kind = "ema" if cfg.method == "ema" else "minmax"
    observe = stats.Observer(lambda f: calibration.init_stats((f,)), lambda s, x: calibration.observe(s, x, kind, cfg.ema_decay))
    first = stats.check_finite(run(observe, {p + PROBE: calibration.init_stats(shapes[p]) for p in ops}), "calibrate")
    if cfg.method in ("minmax", "ema"):
        return {p: (s["min"], s["max"]) for p, s in first.items()}
    amax = {p: jnp.maximum(-s["min"], s["max"]) for p, s in first.items()}
    if cfg.method == "absmax":
        return {p: (-a, a) for p, a in amax.items()}
    found = run(stats.histogram(cfg.bins), {p + PROBE: stats.histogram_start(amax[p], cfg.bins) for p in ops})
    t = {p: _threshold(h, cfg.method, ops[p].rule.act, cfg.percentile) for p, h in found.items()}
    return {p: (-v, v) for p, v in stats.check_finite(t, "calibrate").items()}


def mse_weight(path: str, op: QuantizedOp) -> None:
    """Pack the op's float weight with the per-tile clip that minimises its squared error (`mse_clip_search`)."""
    if op.rule.weight is None or op.kernel is None:
        return  # nothing to quantize, or weights that live inside an intercepted module
    w = op.kernel.get_value()
    if isinstance(w, QArray):
        raise ValueError(f"calibrate: {path} already holds packed weights; weights='mse' needs the float weights "
                         "(quantize in qat or calibrate mode first)")  # fmt: skip
    if getattr(op, "n_stacked", 0):
        raise ValueError(f"calibrate: {path} holds stacked (scan_layers) layers; load the model with scan_layers: false")
    spec = op.rule.weight.replace(rounding="nearest")
    scale, zero_point = R.mse_clip_search(w, spec)
    op.set_weight(quantize(w, spec, scale=scale, zero_point=zero_point))


def check(model, cfg: CalibrateConfig) -> None:
    """Stacked (scan_layers) layers cannot be observed per layer once quantized."""
    if getattr(getattr(model, "config", None), "scan_layers", False):
        raise ValueError("calibrate: stacked (scan_layers) layers are not supported; load the model with scan_layers: false")


@register("calibrate", CalibrateConfig, check=check)
def calibrate(model, cfg: CalibrateConfig, ctx: Context):
    ops = {path_str(p): m for p, m in nnx.iter_modules(model) if isinstance(m, QuantizedOp) and re.fullmatch(cfg.pattern, path_str(p))}
    static = {p: op for p, op in ops.items() if op.rule.act is not None and op.rule.static_act}
    if not static and cfg.weights == "absmax":
        raise ValueError(f"calibrate: no quantized op with static activation scales matches {cfg.pattern!r} ({len(ops)} "
                         "quantized op(s) matched); quantize first with rules that set static_act: true")  # fmt: skip
    if static:
        for p, (lo, hi) in activation_ranges(model, static, cfg, ctx).items():
            scale, zero_point = scale_from_range(lo, hi, static[p].rule.act)
            static[p].act_scale = StaticScale({"scale": scale, "zero_point": zero_point})
    if cfg.weights == "mse":
        for p, op in ops.items():
            mse_weight(p, op)
    return qjax.quantize(model, qjax.Recipe(()), cfg.mode)

"""QuantSpec (how to quantize a tensor), scales, `quantize` → QArray, and differentiable fake quantization."""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics.formats import Format, get_format
from qjax.numerics.granularity import Granularity, expand_to_tiles, from_tiles, per_group, per_tensor, tile_axes, to_tiles
from qjax.numerics.packing import pack
from qjax.numerics.qarray import QArray
from qjax.numerics.rounding import Rounding, round_to_grid

ScaleMode = Literal["float", "pow2"]
_SCALE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    format: element format (name or `Format`).
    granularity: which elements share a scale (see `qjax.numerics.granularity`).
    symmetric: abs-max scaling with no zero point; otherwise min-max with an integer zero point.
    clip_ratio: shrink the measured range by this factor before computing the scale (0 < r <= 1).
    scale_mode: "float" scales, or "pow2" shared power-of-two scales (OCP microscaling, stored as e8m0).
    scale_dtype: storage dtype of float scales ("float32", "bfloat16", "float16").
    rounding: "nearest" (half to even) or "stochastic" (needs a PRNG key at quantize time).
    """

    format: Format | str = "int8"
    granularity: Granularity = dataclasses.field(default_factory=per_tensor)
    symmetric: bool = True
    clip_ratio: float = 1.0
    scale_mode: ScaleMode = "float"
    scale_dtype: str = "float32"
    rounding: Rounding = "nearest"

    def __post_init__(self):
        fmt = get_format(self.format)
        object.__setattr__(self, "format", fmt)
        if not isinstance(self.granularity, Granularity):
            raise TypeError(f"granularity must be a Granularity, got {type(self.granularity).__name__}")
        if not 0.0 < float(self.clip_ratio) <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if not self.symmetric and fmt.kind != "int":
            raise ValueError(f"asymmetric (zero-point) quantization needs an integer format, got {fmt.name}")
        if self.scale_mode not in ("float", "pow2"):
            raise ValueError(f"scale_mode must be 'float' or 'pow2', got {self.scale_mode!r}")
        if self.scale_mode == "pow2" and not self.symmetric:
            raise ValueError("power-of-two (microscaling) scales are symmetric; set symmetric=True")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {self.rounding!r}")

    def replace(self, **changes) -> QuantSpec:
        return dataclasses.replace(self, **changes)


def mx_spec(format: str, axis: int = -1, block: int = 32) -> QuantSpec:
    """OCP microscaling: blocks of 32 elements along `axis` share a power-of-two (e8m0) scale."""
    return QuantSpec(format=format, granularity=per_group(axis, block), scale_mode="pow2")


def mxfp8(axis: int = -1) -> QuantSpec:
    return mx_spec("fp8_e4m3", axis)


def mxfp4(axis: int = -1) -> QuantSpec:
    return mx_spec("fp4_e2m1", axis)


# ---- input checks ---------------------------------------------------------------------------------


def check_input(x, name: str = "x") -> jax.Array:
    """A clear, early error for non-float input, and (when the values are concrete) NaN or Inf."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array to quantize, got dtype {x.dtype}")
    if isinstance(x, jax.core.Tracer):  # under jit/grad the values are unknown; see docs for checkify
        return x
    finite = np.isfinite(np.asarray(x, np.float32))  # host-side: never staged into an enclosing trace
    if not finite.all():
        n_bad = int((~finite).sum())
        raise ValueError(f"{name} contains {n_bad} NaN/Inf value(s); quantization scales would be meaningless")
    return x


# ---- scales -----------------------------------------------------------------------------------------


def compute_scale(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array | None]:
    """Scale (and zero point) for every tile of `x`, from its abs-max (symmetric) or min/max range."""
    tiles = spec.granularity.tile_shape(x.shape)
    return _range_scale(to_tiles(x.astype(jnp.float32), tiles), spec)


def _range_scale(xt: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array | None]:
    axes = tile_axes(xt.ndim // 2)
    compact = xt.shape[0::2]
    lo, hi = jnp.min(xt, axis=axes).reshape(compact), jnp.max(xt, axis=axes).reshape(compact)
    return scale_from_range(lo, hi, spec)


def scale_from_range(lo: jax.Array, hi: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array | None]:
    """The spec's scale (and zero point) for a measured range per tile: the one rule every scale comes from.

    `lo`/`hi` (any equal shapes) are clamped so that lo <= 0 <= hi and shrunk by `clip_ratio`.
    Symmetric: abs-max max(-lo, hi) maps to the format's largest value (pow2: the OCP MX shared
    exponent floor(log2(amax)) - emax, stored as e8m0). Asymmetric: [lo, hi] maps to [qmin, qmax]
    with an integer zero point. Float scales are stored as `spec.scale_dtype`.
    """
    fmt = spec.format
    lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0) * spec.clip_ratio
    hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0) * spec.clip_ratio
    if spec.symmetric:
        amax = jnp.maximum(-lo, hi)
        if spec.scale_mode == "pow2":
            emax = np.floor(np.log2(fmt.max_value))
            exp = jnp.floor(jnp.log2(jnp.where(amax > 0, amax, 1.0))) - emax
            return jnp.exp2(exp).astype(jnp.float8_e8m0fnu), None
        scale = jnp.where(amax > 0, amax / fmt.max_value, 1.0)
        return scale.astype(_SCALE_DTYPES[spec.scale_dtype]), None
    scale = jnp.where(hi > lo, (hi - lo) / (fmt.qmax - fmt.qmin), 1.0).astype(_SCALE_DTYPES[spec.scale_dtype])
    zero_point = jnp.clip(jnp.round(fmt.qmin - lo / scale.astype(jnp.float32)), fmt.qmin, fmt.qmax)
    return scale, zero_point.astype(fmt.storage_dtype)


# ---- quantize / fake quantize -------------------------------------------------------------------------


def _quantize_tiled(x, spec, key, scale, zero_point):
    """Round `x` onto the grid tile by tile. Returns (on-grid values in tiled view, tiles, scale, zero point)."""
    tiles = spec.granularity.tile_shape(x.shape)
    xt = to_tiles(x.astype(jnp.float32), tiles)
    if scale is None:
        scale, zero_point = _range_scale(xt, spec)
    elif tuple(scale.shape) != xt.shape[0::2]:
        raise ValueError(f"static scale has shape {tuple(scale.shape)}, expected {xt.shape[0::2]} for {spec.granularity}")
    v = xt / expand_to_tiles(scale.astype(jnp.float32))
    if zero_point is not None:
        v = v + expand_to_tiles(zero_point.astype(jnp.float32))
    return round_to_grid(v, spec.format, spec.rounding, key), tiles, scale, zero_point


def _dequantize_tiled(qt, scale, zero_point, shape):
    if zero_point is not None:
        qt = qt - expand_to_tiles(zero_point.astype(jnp.float32))
    return from_tiles(qt * expand_to_tiles(scale.astype(jnp.float32)), shape)


def quantize(
    x: jax.Array,
    spec: QuantSpec,
    *,
    key: jax.Array | None = None,
    scale: jax.Array | None = None,
    zero_point: jax.Array | None = None,
) -> QArray:
    """Quantize `x` into a packed `QArray`. Pass `scale`/`zero_point` for static (calibrated) scales."""
    x = check_input(x)
    fmt = spec.format
    qt, tiles, scale, zero_point = _quantize_tiled(x, spec, key, scale, zero_point)
    codes = fmt.encode(from_tiles(qt))
    if fmt.packed:
        codes = pack(codes, fmt.bits)
    return QArray(codes, scale, zero_point, fmt, tuple(x.shape), tiles, jnp.dtype(x.dtype).name)


def quantize_dequantize(x, spec, key=None, scale=None, zero_point=None) -> jax.Array:
    """Round trip through the format, in x's dtype; no gradient rule (see `fake_quant`)."""
    qt, _, scale, zero_point = _quantize_tiled(x, spec, key, scale, zero_point)
    return _dequantize_tiled(qt, scale, zero_point, x.shape).astype(x.dtype)


GradientRule = Literal["ste", "clipped_ste"]


def fake_quant(
    x: jax.Array,
    spec: QuantSpec,
    *,
    key: jax.Array | None = None,
    gradient: GradientRule = "ste",
    scale: jax.Array | None = None,
    zero_point: jax.Array | None = None,
) -> jax.Array:
    """Quantize→dequantize `x` with a straight-through gradient.

    "ste": d out/d x = 1 everywhere. "clipped_ste": 1 where x lies inside the representable range of
    its tile ([qmin, qmax] after scaling, i.e. not clipped by `clip_ratio` or a static scale), else 0.
    """
    x = check_input(x)
    if gradient == "ste":
        return _ste(x, key, scale, zero_point, spec)
    if gradient == "clipped_ste":
        return _clipped_ste(x, key, scale, zero_point, spec)
    raise ValueError(f"unknown gradient rule {gradient!r}; expected 'ste' or 'clipped_ste'")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ste(x, key, scale, zero_point, spec):
    return quantize_dequantize(x, spec, key, scale, zero_point)


def _ste_fwd(x, key, scale, zero_point, spec):
    return _ste(x, key, scale, zero_point, spec), (scale, zero_point)


def _ste_bwd(spec, res, g):
    scale, zero_point = res
    return g, None, _zeros_like_or_none(scale), _zeros_like_or_none(zero_point)


_ste.defvjp(_ste_fwd, _ste_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _clipped_ste(x, key, scale, zero_point, spec):
    return quantize_dequantize(x, spec, key, scale, zero_point)


def _clipped_ste_fwd(x, key, scale, zero_point, spec):
    out = _clipped_ste(x, key, scale, zero_point, spec)
    return out, (_in_range_mask(x, spec, scale, zero_point), scale, zero_point)


def _clipped_ste_bwd(spec, res, g):
    inside, scale, zero_point = res
    return jnp.where(inside, g, 0).astype(g.dtype), None, _zeros_like_or_none(scale), _zeros_like_or_none(zero_point)


_clipped_ste.defvjp(_clipped_ste_fwd, _clipped_ste_bwd)


def _zeros_like_or_none(a):
    if a is None:
        return None
    return jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.inexact) else np.zeros(a.shape, jax.dtypes.float0)


def _in_range_mask(x, spec, scale, zero_point) -> jax.Array:
    """Elements whose scaled value falls inside the format's range (not saturated)."""
    fmt = spec.format
    tiles = spec.granularity.tile_shape(x.shape)
    xt = to_tiles(x.astype(jnp.float32), tiles)
    if scale is None:
        scale, zero_point = _range_scale(xt, spec)
    v = xt / expand_to_tiles(scale.astype(jnp.float32))
    if zero_point is not None:
        v = v + expand_to_tiles(zero_point.astype(jnp.float32))
    lo, hi = (fmt.qmin, fmt.qmax) if fmt.kind == "int" else (-fmt.max_value, fmt.max_value)
    return from_tiles((v >= lo) & (v <= hi), x.shape)


# ---- learnable scales (LSQ) ------------------------------------------------------------------------


def lsq_fake_quant(x: jax.Array, scale: jax.Array, spec: QuantSpec, grad_scale: float | None = None) -> jax.Array:
    """Fake quantization with a learnable scale (LSQ, Esser et al. 2020).

    `scale` has the compact per-tile shape of `spec.granularity` (see `init_lsq_scale`). Gradients:
    d/dx = 1 inside the range, 0 outside; d/ds = q(v) - v inside, q(v) (the saturated level) outside,
    with v = x / s; multiplied by `grad_scale` (default 1/sqrt(elements per scale * max level)).
    """
    if not spec.symmetric:
        raise ValueError("lsq_fake_quant learns a symmetric scale; use symmetric=True")
    x = check_input(x)
    tiles = spec.granularity.tile_shape(x.shape)
    if grad_scale is None:
        per_scale = int(np.prod(tiles))
        grad_scale = float(1.0 / np.sqrt(per_scale * spec.format.max_value))
    return _lsq(x, scale, spec, grad_scale)


def init_lsq_scale(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """LSQ's initial scale: 2·mean|x| / sqrt(max level), per tile."""
    tiles = spec.granularity.tile_shape(x.shape)
    xt = to_tiles(jnp.abs(x.astype(jnp.float32)), tiles)
    count = np.prod(tiles)
    mean = (jnp.sum(xt, axis=tile_axes(x.ndim)) / count).reshape(xt.shape[0::2])
    return jnp.maximum(2 * mean / np.sqrt(spec.format.max_value), 1e-8)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _lsq(x, scale, spec, grad_scale):
    return quantize_dequantize(x, spec.replace(rounding="nearest"), None, scale, None)


def _lsq_fwd(x, scale, spec, grad_scale):
    return _lsq(x, scale, spec, grad_scale), (x, scale)


def _lsq_bwd(spec, grad_scale, res, g):
    x, scale = res
    fmt = spec.format
    tiles = spec.granularity.tile_shape(x.shape)
    xt = to_tiles(x.astype(jnp.float32), tiles)
    gt = to_tiles(g.astype(jnp.float32), tiles)
    v = xt / expand_to_tiles(scale.astype(jnp.float32))
    q = round_to_grid(v, fmt)
    lo, hi = (fmt.qmin, fmt.qmax) if fmt.kind == "int" else (-fmt.max_value, fmt.max_value)
    inside = (v >= lo) & (v <= hi)
    dx = from_tiles(jnp.where(inside, gt, 0.0), x.shape).astype(x.dtype)
    ds_elem = jnp.where(inside, q - v, q) * gt
    ds = jnp.sum(ds_elem, axis=tile_axes(x.ndim)).reshape(scale.shape) * grad_scale
    return dx, ds.astype(scale.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)

"""Range observers for calibration: pure functions from (stats, batch) to new stats, and stats to scales.

Stats are a dict {min, max, count, nonfinite} of float32 arrays: min/max per tensor (shape ()) or per
feature (shape (F,)), the number of batches seen, and the number of NaN/Inf values met (min/max
reductions skip NaN on some backends, so non-finite inputs are counted explicitly).
"""

from __future__ import annotations

import jax.numpy as jnp

from qjax.numerics import QuantSpec, scale_from_range
from qjax.numerics.ranges import ema_range


def stat_shape(spec: QuantSpec, features: int) -> tuple[int, ...]:
    """Shape of calibration statistics for an activation spec: () per-tensor, (F,) per-feature."""
    g = spec.granularity
    if g.rest == "reduce" and not g.tiles:
        return ()
    if g.rest == "reduce" and len(g.tiles) == 1 and g.tiles[0] == (-1, 1):
        return (features,)
    raise ValueError(
        f"static activation scales need per_tensor() or per_axis(-1) granularity, got {g}; "
        "use dynamic scales (static_act=False) for per-token or grouped activations"
    )


def init_stats(shape: tuple[int, ...]) -> dict[str, jnp.ndarray]:
    return {
        "min": jnp.full(shape, jnp.inf, jnp.float32),
        "max": jnp.full(shape, -jnp.inf, jnp.float32),
        "count": jnp.zeros((), jnp.float32),
        "nonfinite": jnp.zeros((), jnp.float32),
    }


def observe(stats: dict, x: jnp.ndarray, observer: str, ema_decay: float = 0.01, percentile: float = 99.99) -> dict:
    """Fold one batch `x` (..., F) into the running statistics."""
    per_feature = stats["min"].ndim == 1
    flat = x.astype(jnp.float32).reshape(-1, x.shape[-1]) if per_feature else x.astype(jnp.float32).reshape(-1)
    if observer == "percentile":
        lo = jnp.percentile(flat, 100 - percentile, axis=0)
        hi = jnp.percentile(flat, percentile, axis=0)
    else:
        lo, hi = jnp.min(flat, axis=0), jnp.max(flat, axis=0)
    n = stats["count"]
    first = n == 0
    if observer == "minmax":
        new_lo, new_hi = jnp.minimum(stats["min"], lo), jnp.maximum(stats["max"], hi)
    elif observer == "ema":
        new_lo = jnp.where(first, lo, ema_range(stats["min"], lo, ema_decay))
        new_hi = jnp.where(first, hi, ema_range(stats["max"], hi, ema_decay))
    elif observer == "percentile":  # running mean of per-batch percentiles
        new_lo = jnp.where(first, lo, (stats["min"] * n + lo) / (n + 1))
        new_hi = jnp.where(first, hi, (stats["max"] * n + hi) / (n + 1))
    else:
        raise ValueError(f"unknown observer {observer!r}")
    bad = jnp.sum(~jnp.isfinite(flat)).astype(jnp.float32)
    return {"min": new_lo, "max": new_hi, "count": n + 1, "nonfinite": stats["nonfinite"] + bad}


def scale_from_stats(stats: dict, spec: QuantSpec) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """Static scale (and zero point) from calibrated statistics: the same rule as dynamic scales (`scale_from_range`)."""
    if bool(jnp.any(stats["count"] == 0)):
        raise ValueError("no calibration statistics: run the model in 'calibrate' mode on some batches first")
    bad = int(jnp.sum(stats["nonfinite"]))
    if bad or not bool(jnp.all(jnp.isfinite(stats["min"])) and jnp.all(jnp.isfinite(stats["max"]))):
        raise ValueError(f"calibration statistics contain NaN/Inf ({bad} non-finite activation values seen): "
                         "the calibration batches, or the activations they produced, were not finite")  # fmt: skip
    return scale_from_range(stats["min"], stats["max"], spec)


def broadcast_static(param: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """A per-tensor () or per-feature (F,) static parameter in the compact tile shape of an ndim input."""
    return param.reshape((1,) * (ndim - param.ndim) + tuple(param.shape))


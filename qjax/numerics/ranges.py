"""Range calibrators: pure functions from statistics (or a whole weight) to a clipping range per tile.

Activations stream, so they are calibrated from statistics: an abs-max pass fixes `amax`, a second
pass folds batches into a `Histogram` of |x| over [0, amax], and a calibrator (`percentile_range`,
`kl_range`, `mse_range`) turns it into an abs-max-style threshold t per tensor or per feature, from
which `scale_from_range(-t, t, spec)` makes the scale. Weights are available whole, so
`mse_clip_search` searches their clip ratio per tile directly and returns the scale.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics.formats import Format, get_format
from qjax.numerics.granularity import per_token, tile_axes, to_tiles
from qjax.numerics.quantize import QuantSpec, quantize_dequantize, scale_from_range


class Histogram(NamedTuple):
    """Counts of |x| in equal bins over [0, amax] (values beyond amax in the last bin); a pytree."""

    counts: jax.Array  # (..., bins) float32
    amax: jax.Array  # (...) upper edge of the last bin


def histogram_init(shape: tuple[int, ...] = (), bins: int = 2048) -> Histogram:
    """An empty histogram per tensor (shape ()) or per feature (shape (F,)), to fold batches into."""
    return Histogram(jnp.zeros((*shape, bins), jnp.float32), jnp.zeros(shape, jnp.float32))


def histogram_update(h: Histogram, x: jax.Array, amax: jax.Array) -> Histogram:
    """Fold a batch x (..., *shape) into `h` over the fixed range [0, amax] from a previous abs-max pass.

    Bin k holds amax·[k, k+1)/bins (the last bin also everything >= amax); NaNs are not counted.
    `amax` must be the same for every batch folded into one histogram.
    """
    shape, bins = h.amax.shape, h.counts.shape[-1]
    if tuple(x.shape[x.ndim - len(shape) :]) != shape:
        raise ValueError(f"histogram of shape {shape} needs x (..., {', '.join(map(str, shape))}), got {x.shape}")
    n = math.prod(shape)
    amax = jnp.broadcast_to(jnp.asarray(amax, jnp.float32), shape)
    v = jnp.abs(x.astype(jnp.float32)).reshape(-1, n)
    pos = v / jnp.maximum(amax.reshape(n), jnp.finfo(jnp.float32).tiny) * bins
    idx = jnp.clip(jnp.floor(jnp.where(jnp.isnan(v), 0.0, pos)), 0, bins - 1).astype(jnp.int32)
    flat = (idx + jnp.arange(n, dtype=jnp.int32) * bins).ravel()
    counts = jnp.bincount(flat, weights=(~jnp.isnan(v)).ravel().astype(jnp.float32), length=n * bins)
    return Histogram(h.counts + counts.reshape(h.counts.shape), amax)


def percentile_range(h: Histogram, p: float = 99.99) -> jax.Array:
    """The |x| below which p% of the mass lies, interpolated within its bin: drops the rarest outliers."""
    counts, bins = h.counts, h.counts.shape[-1]
    cdf = jnp.cumsum(counts, axis=-1)
    target = cdf[..., -1:] * (p / 100.0)
    k = jnp.minimum(jnp.sum(cdf < target, axis=-1, keepdims=True), bins - 1)
    below = jnp.take_along_axis(cdf - counts, k, axis=-1)
    inside = jnp.take_along_axis(counts, k, axis=-1)
    frac = jnp.where(inside > 0, (target - below) / jnp.where(inside > 0, inside, 1.0), 0.0)
    return ((k + frac)[..., 0] / bins * h.amax).astype(jnp.float32)


def format_levels(fmt: Format | QuantSpec | str) -> int:
    """Levels on one side of zero, the resolution KL calibration targets: qmax+1 for int, half the grid else."""
    fmt = get_format(fmt.format if isinstance(fmt, QuantSpec) else fmt)
    return fmt.qmax + 1 if fmt.kind == "int" else len(fmt.grid) // 2


def kl_range(h: Histogram, fmt_levels: int | Format | QuantSpec | str = 128, stride: int = 1) -> jax.Array:
    """TensorRT entropy calibration: the threshold whose clipped-and-quantized histogram is closest in KL.

    For each candidate i in levels, levels+stride, ..., bins: P = counts[:i] with the outliers folded
    into bin i-1; Q = counts[:i] merged into `levels` bins (i // levels fine bins each, the remainder
    in the last) and spread back evenly over the bins where P is nonzero. Returns i·amax/bins for
    the i minimising KL(P‖Q) (ties: the smallest); a candidate whose Q is empty where P holds folded
    outliers scores +inf (no smoothing). `fmt_levels`: an int or a format (`format_levels`).
    """
    levels = fmt_levels if isinstance(fmt_levels, int) else format_levels(fmt_levels)
    bins = h.counts.shape[-1]
    if not 0 < levels <= bins:
        raise ValueError(f"kl_range needs 0 < levels <= bins, got {levels} levels for {bins} bins")
    counts = h.counts.reshape(-1, bins).T  # (bins, C)
    j = jnp.arange(bins)

    def divergence(i):
        inside = (j < i)[:, None]
        outliers = jnp.sum(jnp.where(inside, 0.0, counts), axis=0)
        ref = jnp.where(inside, counts, 0.0)
        p = ref + jnp.where((j == i - 1)[:, None], outliers, 0.0)
        nonzero = p > 0
        merged = jnp.where(j < i, jnp.minimum(j // (i // levels), levels - 1), levels)  # beyond i: a dropped segment
        q_sum = jax.ops.segment_sum(ref, merged, levels + 1)
        q_num = jax.ops.segment_sum(nonzero.astype(jnp.float32), merged, levels + 1)
        q = jnp.where(nonzero, (q_sum / jnp.maximum(q_num, 1.0))[merged], 0.0)
        p, q = p / jnp.sum(p, axis=0), q / jnp.maximum(jnp.sum(q, axis=0), jnp.finfo(jnp.float32).tiny)
        return jnp.sum(jnp.where(nonzero, p * jnp.log(p / jnp.where(nonzero, q, 1.0)), 0.0), axis=0)

    candidates = jnp.arange(levels, bins + 1, stride)
    best = candidates[jnp.argmin(jax.lax.map(divergence, candidates), axis=0)]
    return (best.reshape(h.amax.shape) / bins * h.amax).astype(jnp.float32)


def _clip_ratios(grid: int, min_ratio: float) -> jax.Array:
    """Candidate clip ratios 1, 1 - 1/grid, ... down to min_ratio (largest first, so ties keep the widest)."""
    return jnp.asarray(1.0 - np.arange(int(round((1.0 - min_ratio) * grid)) + 1) / grid, jnp.float32)


def mse_range(h: Histogram, spec: QuantSpec, grid: int = 100, min_ratio: float = 0.01) -> jax.Array:
    """Threshold r·amax minimising the squared error of quantizing the histogram (bin centres × counts).

    Each candidate range [-t, t] gets its scale from `scale_from_range` and `spec`'s format; |x|
    histograms carry no sign, so the error is that of the magnitudes. Ratios as in `mse_clip_search`.
    """
    bins = h.counts.shape[-1]
    counts = h.counts.reshape(-1, bins)
    amax = h.amax.reshape(-1, 1)
    centres = (jnp.arange(bins, dtype=jnp.float32) + 0.5) / bins * amax  # (C, bins)
    row = spec.replace(granularity=per_token(), rounding="nearest", clip_ratio=1.0)
    ratios = _clip_ratios(grid, min_ratio)

    def error(r):
        scale, zero_point = scale_from_range(-amax * r, amax * r, row)
        x_hat = quantize_dequantize(centres, row, scale=scale, zero_point=zero_point)
        return jnp.sum(counts * (x_hat - centres) ** 2, axis=-1)

    best = ratios[jnp.argmin(jax.lax.map(error, ratios), axis=0)]
    return (best.reshape(h.amax.shape) * h.amax).astype(jnp.float32)


def mse_clip_search(
    x: jax.Array, spec: QuantSpec, grid: int = 100, min_ratio: float = 0.5
) -> tuple[jax.Array, jax.Array | None]:
    """Per-tile clip ratio search for weights: the scale (and zero point) minimising ‖Q(x) − x‖² per tile.

    Candidate ratios are 1 - k/grid down to `min_ratio` (spec.clip_ratio is replaced by the search);
    each shrinks the tile's [min, max] before `scale_from_range`. Ratio 1 (abs-max) is a candidate
    and wins ties, so no tile does worse than abs-max. Returns scales in the spec's compact tile
    shape and dtype, ready for `quantize(x, spec, scale=..., zero_point=...)`.
    """
    x = jnp.asarray(x, jnp.float32)
    tiles = spec.granularity.tile_shape(x.shape)
    xt = to_tiles(x, tiles)
    axes, compact = tile_axes(x.ndim), xt.shape[0::2]
    lo, hi = jnp.min(xt, axis=axes).reshape(compact), jnp.max(xt, axis=axes).reshape(compact)
    search = spec.replace(rounding="nearest", clip_ratio=1.0)

    def candidate(r):
        scale, zero_point = scale_from_range(lo * r, hi * r, search)
        err = to_tiles((quantize_dequantize(x, search, scale=scale, zero_point=zero_point) - x) ** 2, tiles)
        return jnp.sum(err, axis=axes).reshape(compact), scale, zero_point

    def step(best, r):
        new = candidate(r)
        better = new[0] < best[0]
        return jax.tree.map(lambda n, b: jnp.where(better, n.astype(jnp.float32), b), new, best), None

    ratios = _clip_ratios(grid, min_ratio)
    widest = candidate(ratios[0])
    (_, scale, zero_point), _ = jax.lax.scan(step, jax.tree.map(lambda a: a.astype(jnp.float32), widest), ratios[1:])
    return scale.astype(widest[1].dtype), None if zero_point is None else zero_point.astype(widest[2].dtype)


def ema_range(prev: jax.Array, new: jax.Array, decay: float = 0.01) -> jax.Array:
    """Exponential moving average of a range: (1 - decay)·prev + decay·new (decay weighs the new batch, as Rule.ema_decay)."""
    return (1 - decay) * prev + decay * new

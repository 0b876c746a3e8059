"""Rounding onto a format's grid: round-to-nearest-even and stochastic rounding (explicit PRNG key).

Inputs are already divided by their scale (and shifted by their zero point); outputs are float32
values that lie exactly on the format's grid, saturated to its range.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from qjax.numerics.formats import Format

Rounding = Literal["nearest", "stochastic"]


def round_to_grid(v: jnp.ndarray, fmt: Format, rounding: Rounding = "nearest", key: jax.Array | None = None) -> jnp.ndarray:
    """Round `v` onto `fmt`'s grid with saturation. Stochastic rounding needs `key` and is unbiased in range."""
    v = v.astype(jnp.float32)
    if rounding == "nearest":
        return _round_nearest(v, fmt)
    if rounding == "stochastic":
        if key is None:
            raise ValueError("stochastic rounding needs an explicit PRNG `key`")
        return _round_stochastic(v, fmt, key)
    raise ValueError(f"unknown rounding {rounding!r}; expected 'nearest' or 'stochastic'")


def _round_nearest(v: jnp.ndarray, fmt: Format) -> jnp.ndarray:
    if fmt.kind == "int":
        return jnp.clip(jnp.round(v), fmt.qmin, fmt.qmax)  # jnp.round rounds half to even
    m = fmt.max_value
    if fmt.dtype is not None:  # the native cast is round-to-nearest-even; saturate first (e4m3fn has no inf)
        return jnp.clip(v, -m, m).astype(fmt.dtype).astype(jnp.float32)
    grid = jnp.asarray(fmt.grid, jnp.float32)
    midpoints = (grid[1:] + grid[:-1]) / 2
    return grid[jnp.searchsorted(midpoints, v, side="left")]


def _round_stochastic(v: jnp.ndarray, fmt: Format, key: jax.Array) -> jnp.ndarray:
    u = jax.random.uniform(key, v.shape, jnp.float32)
    if fmt.kind == "int":
        return jnp.clip(jnp.floor(v + u), fmt.qmin, fmt.qmax)
    grid = jnp.asarray(fmt.grid, jnp.float32)
    v = jnp.clip(v, grid[0], grid[-1])
    i = jnp.clip(jnp.searchsorted(grid, v, side="right") - 1, 0, grid.shape[0] - 2)
    lo, hi = grid[i], grid[i + 1]
    p_up = (v - lo) / (hi - lo)
    return jnp.where(u < p_up, hi, lo)

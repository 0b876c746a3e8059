"""Granularity: which elements share one scale.

Every granularity is a tile shape. Per-tensor is one tile covering the tensor; per-channel keeps one
axis at tile size 1; per-group tiles one axis with the group size and keeps the others; per-block
tiles several axes. A scale therefore always has shape `ceil(shape / tile)`: one representation for
all granularities. Tile sizes that do not divide an axis are handled by zero padding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import jax.numpy as jnp

FULL = -1  # tile size meaning "the whole axis"


@dataclasses.dataclass(frozen=True)
class Granularity:
    """Tile sizes along some axes; axes not named are reduced over (`rest="reduce"`) or kept per element."""

    tiles: tuple[tuple[int, int], ...] = ()  # (axis, tile size); FULL = the whole axis
    rest: Literal["reduce", "keep"] = "reduce"

    def __post_init__(self):
        for axis, size in self.tiles:
            if not isinstance(axis, int) or not isinstance(size, int):
                raise TypeError(f"granularity tiles must be (int axis, int size) pairs, got {(axis, size)}")
            if size != FULL and size <= 0:
                raise ValueError(f"group/tile size must be positive, got {size} for axis {axis}")
        if self.rest not in ("reduce", "keep"):
            raise ValueError(f"granularity rest must be 'reduce' or 'keep', got {self.rest!r}")

    def tile_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Resolved tile size for every axis of a tensor of `shape` (never larger than the axis)."""
        ndim = len(shape)
        default = FULL if self.rest == "reduce" else 1
        tiles = [default] * ndim
        for axis, size in self.tiles:
            if not -ndim <= axis < ndim:
                raise ValueError(f"granularity axis {axis} is out of range for a tensor of rank {ndim} {tuple(shape)}")
            tiles[axis % ndim] = size
        return tuple(d if t == FULL or t >= d else t for d, t in zip(shape, tiles))

    def __repr__(self) -> str:
        if not self.tiles:
            return "per_tensor()" if self.rest == "reduce" else "per_element()"
        return f"Granularity(tiles={dict(self.tiles)}, rest={self.rest!r})"


def per_tensor() -> Granularity:
    """One scale for the whole tensor."""
    return Granularity()


def per_axis(*axes: int) -> Granularity:
    """One scale per index of `axes` (e.g. per output channel, per token); other axes reduced."""
    if not axes:
        raise ValueError("per_axis needs at least one axis")
    return Granularity(tiles=tuple((a, 1) for a in axes))


per_channel = per_axis


def per_token(*axes: int) -> Granularity:
    """One scale per token: every axis but the last (feature) axis is kept, unless `axes` are given."""
    if axes:
        return per_axis(*axes)
    return Granularity(tiles=((-1, FULL),), rest="keep")


def per_group(axis: int, size: int) -> Granularity:
    """Groups of `size` consecutive elements along `axis`; one scale per group and per index of every other axis."""
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"group size must be a positive integer, got {size!r}")
    return Granularity(tiles=((axis, size),), rest="keep")


def per_block(sizes: dict[int, int] | Sequence[int]) -> Granularity:
    """2-D (or n-D) tiles: `{axis: size}`, or a sequence with one size per leading axis. Other axes kept."""
    items = sizes.items() if isinstance(sizes, dict) else enumerate(sizes)
    return Granularity(tiles=tuple((int(a), int(s)) for a, s in items), rest="keep")


# ---- tiled views ----------------------------------------------------------------------------------


def padded_shape(shape: Sequence[int], tiles: Sequence[int]) -> tuple[int, ...]:
    return tuple(math.ceil(d / t) * t for d, t in zip(shape, tiles))


def scale_shape(shape: Sequence[int], tiles: Sequence[int]) -> tuple[int, ...]:
    return tuple(math.ceil(d / t) for d, t in zip(shape, tiles))


def to_tiles(x: jnp.ndarray, tiles: Sequence[int]) -> jnp.ndarray:
    """Zero-pad `x` to whole tiles and view it as (n0, t0, n1, t1, ...)."""
    padded = padded_shape(x.shape, tiles)
    if padded != x.shape:
        x = jnp.pad(x, [(0, p - d) for d, p in zip(x.shape, padded)])
    interleaved = [v for n, t in zip(scale_shape(padded, tiles), tiles) for v in (n, t)]
    return x.reshape(interleaved)


def from_tiles(xt: jnp.ndarray, shape: Sequence[int] | None = None) -> jnp.ndarray:
    """Inverse of `to_tiles`; slices the padding away when `shape` is given."""
    dims = xt.shape
    x = xt.reshape([dims[i] * dims[i + 1] for i in range(0, len(dims), 2)])
    if shape is not None and tuple(shape) != x.shape:
        x = x[tuple(slice(0, d) for d in shape)]
    return x


def tile_axes(ndim: int) -> tuple[int, ...]:
    """Axes of a tiled view that run within a tile (the ones a scale reduces over)."""
    return tuple(range(1, 2 * ndim, 2))


def expand_to_tiles(s: jnp.ndarray) -> jnp.ndarray:
    """View a compact per-tile array (n0, n1, ...) as (n0, 1, n1, 1, ...) to broadcast over a tiled view."""
    return s.reshape([v for n in s.shape for v in (n, 1)])

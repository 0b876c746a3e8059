"""Invertible linear maps on the feature (last) axis: the vocabulary of function-preserving transforms.

An outlier method rewrites `x @ W` as `(x T) @ (T⁻¹ W)`: the activation is transformed (online, or folded
into the op that produces it) and the weight absorbs the inverse. Every map here is a pytree with

  apply(x): x @ T along the last axis (the activation side),
  dual(x):  x @ T⁻ᵀ along the last axis, so that a kernel W (in, out) becomes `fold_into_kernel(map, W)`
            = T⁻¹ W = dual(Wᵀ)ᵀ (the weight side). For orthogonal maps dual == apply.

Maps compose left to right with `Compose((a, b))`: x ↦ b.apply(a.apply(x)).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp


def _pytree(data: list[str], meta: tuple[str, ...] = ()):
    def wrap(cls):
        return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls), data_fields=data, meta_fields=list(meta))

    return wrap


@_pytree(["scale"])
class ChannelScale:
    """x ↦ x / s per channel (SmoothQuant-style smoothing); its dual multiplies by s."""

    scale: jax.Array

    @property
    def size(self) -> int:
        return self.scale.shape[-1]

    def apply(self, x):
        return x / self.scale.astype(x.dtype)

    def dual(self, x):
        return x * self.scale.astype(x.dtype)


@_pytree(["index"])
class Permutation:
    """x ↦ x[..., index]: output channel i is input channel index[i] (orthogonal)."""

    index: jax.Array

    @property
    def size(self) -> int:
        return self.index.shape[-1]

    def apply(self, x):
        return jnp.take(x, self.index, axis=-1)

    dual = apply


@_pytree(["blocks"])
class BlockDiagonal:
    """x ↦ x @ diag(B_0, ..., B_{n-1}) with n square blocks (n, b, b); a single block (1, b, b) is a dense map.

    `orthogonal=True` blocks (rotations) use dual == apply; otherwise dual uses the inverse transpose.
    """

    blocks: jax.Array

    @property
    def size(self) -> int:
        return self.blocks.shape[0] * self.blocks.shape[1]

    def apply(self, x):
        return _blockwise(x, self.blocks)

    def dual(self, x):
        return _blockwise(x, jnp.swapaxes(jnp.linalg.inv(self.blocks.astype(jnp.float32)), -1, -2))

    def matrix(self) -> jax.Array:
        return jax.scipy.linalg.block_diag(*self.blocks)


@_pytree(["blocks"])
class Rotation(BlockDiagonal):
    """A block-diagonal map whose blocks are orthogonal: dual == apply (no inverse computed)."""

    def dual(self, x):
        return self.apply(x)


def _blockwise(x, blocks):
    n, b, _ = blocks.shape
    if x.shape[-1] != n * b:
        raise ValueError(f"block-diagonal map of size {n}×{b} applied to {x.shape[-1]} features")
    xb = x.reshape(*x.shape[:-1], n, b)
    y = jnp.einsum("...nb,nbc->...nc", xb.astype(jnp.float32), blocks.astype(jnp.float32))
    return y.reshape(x.shape).astype(x.dtype)


@_pytree(["maps"])
class Compose:
    """Maps applied in order: x ↦ maps[-1](...maps[0](x))."""

    maps: tuple

    @property
    def size(self) -> int:
        return self.maps[0].size

    def apply(self, x):
        return functools.reduce(lambda y, m: m.apply(y), self.maps, x)

    def dual(self, x):
        return functools.reduce(lambda y, m: m.dual(y), self.maps, x)


def compose(*maps):
    """Flattened composition; None entries are skipped; a single map is returned as is."""
    flat = []
    for m in maps:
        if m is None:
            continue
        flat.extend(m.maps if isinstance(m, Compose) else (m,))
    if not flat:
        return None
    return flat[0] if len(flat) == 1 else Compose(tuple(flat))


def fold_into_kernel(m, kernel: jax.Array) -> jax.Array:
    """T⁻¹ W for a kernel (..., in, out) whose input is transformed by `m` (x ↦ x T)."""
    return jnp.swapaxes(m.dual(jnp.swapaxes(kernel, -1, -2)), -1, -2)


def fold_into_output(m, kernel: jax.Array, bias: jax.Array | None = None):
    """W T (and b T) for a producer (kernel (..., in, out)) whose *output* is then transformed by `m`."""
    return m.apply(kernel), None if bias is None else m.apply(bias)


def map_nbytes(m) -> int:
    """Bytes a map stores (what an online transform costs in memory)."""
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(m))

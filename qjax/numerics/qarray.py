"""QArray: a quantized tensor as a pytree (stored codes, scale, zero point + static metadata)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from qjax.numerics import packing
from qjax.numerics.formats import Format
from qjax.numerics.granularity import expand_to_tiles, from_tiles, padded_shape, scale_shape, to_tiles


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values", "scale", "zero_point"],
    meta_fields=["format", "shape", "tiles", "dtype"],
)
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized array: `x ≈ (decode(values) - zero_point) * scale`, tile by tile.

    values: stored codes of the tensor zero-padded to whole tiles (`padded_shape`); for formats under
      8 bits the last axis is bit-packed into ceil(padded_shape[-1] * bits / 8) uint8 bytes (dense
      little-endian bitstream, see `qjax.numerics.packing`), so `nbytes` is the real storage.
    scale: one scale per tile, shape `ceil(shape / tiles)` (float32/bf16/f16, or e8m0 for MX).
    zero_point: same shape as `scale` in the format's storage dtype (int8/uint8: zero points exist only
      for integer formats of <= 8 bits), or None when symmetric.
    format, shape, tiles, dtype: static metadata (true shape, tile size per axis, dequantized dtype).
    """

    values: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    format: Format
    shape: tuple[int, ...]
    tiles: tuple[int, ...]
    dtype: str = "float32"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def padded_shape(self) -> tuple[int, ...]:
        return padded_shape(self.shape, self.tiles)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        return scale_shape(self.shape, self.tiles)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: packed codes + scales + zero points (one byte each)."""
        leaves = [self.values, self.scale] + ([] if self.zero_point is None else [self.zero_point])
        return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in leaves)

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / max(1, math.prod(self.shape))

    def codes(self) -> jax.Array:
        """Stored codes in the padded shape, unpacked (int8/uint8, or the native fp8 type)."""
        if not self.format.packed:
            return self.values
        signed = self.format.kind == "int" and self.format.signed
        return packing.unpack(self.values, self.format.bits, self.padded_shape[-1], signed)

    def grid_values(self) -> jax.Array:
        """On-grid float32 values (before zero point and scale), padded shape."""
        return self.format.decode(self.codes())

    def dequantize(self, dtype=None) -> jax.Array:
        """The float tensor this QArray stands for, in its true shape."""
        qt = to_tiles(self.grid_values(), self.tiles)
        if self.zero_point is not None:
            qt = qt - expand_to_tiles(self.zero_point.astype(jnp.float32))
        x = from_tiles(qt * expand_to_tiles(self.scale.astype(jnp.float32)), self.shape)
        return x.astype(dtype or self.dtype)

    def __repr__(self) -> str:
        return (
            f"QArray({self.format.name}, shape={self.shape}, tiles={self.tiles}, "
            f"asymmetric={self.zero_point is not None}, nbytes={self.nbytes})"
        )

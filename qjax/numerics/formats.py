"""Numeric formats: every format qjax knows is defined once here, with its grid and storage width.

A `Format` answers three questions: which values can be represented (`grid`), how wide one element
is in storage (`bits`), and how an on-grid value becomes a stored code and back (`encode`/`decode`).
Rounding *onto* the grid lives in `rounding.py`; scales live in `quantize.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qjax.numerics.packing import packed_length

FormatKind = Literal["int", "float", "codebook"]


@dataclasses.dataclass(frozen=True)
class Format:
    """A quantized element format.

    kind:
      - "int": two's complement (signed) or plain binary (unsigned) integers of `bits` bits.
      - "float": a minifloat with a native ml_dtypes type (fp8 e4m3 / e5m2), stored as that type.
      - "codebook": 16 (or 2**bits) values addressed by a code (fp4 e2m1 in its IEEE-like bit order,
        nf4 in ascending order); stored as packed codes.
    """

    name: str
    kind: FormatKind
    bits: int
    signed: bool = True
    dtype_name: str | None = None  # ml_dtypes name used for round-to-nearest casts, if any
    codebook: tuple[float, ...] | None = None  # value of each code, in code order

    # ---- integer range -------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        if self.kind != "int":
            raise ValueError(f"format {self.name!r} is not an integer format; it has no qmin")
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        if self.kind != "int":
            raise ValueError(f"format {self.name!r} is not an integer format; it has no qmax")
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    # ---- value range ---------------------------------------------------------------------------
    @property
    def max_value(self) -> float:
        """Largest representable magnitude used to map abs-max to the grid (127 for int8, 448 for e4m3)."""
        if self.kind == "int":
            return float(self.qmax)
        return float(np.max(np.abs(self.grid)))

    @property
    def dtype(self):
        """The ml_dtypes numpy type for native casts, or None."""
        return None if self.dtype_name is None else np.dtype(getattr(ml_dtypes, self.dtype_name))

    @property
    def grid(self) -> np.ndarray:
        """Sorted, unique, finite representable values (float64)."""
        return _grid(self)

    # ---- storage -------------------------------------------------------------------------------
    @property
    def storage_dtype(self):
        """Dtype of one stored element before sub-byte packing."""
        if self.kind == "int":
            return jnp.int8 if self.signed else jnp.uint8
        if self.kind == "float":
            return jnp.dtype(self.dtype)
        return jnp.uint8

    @property
    def packed(self) -> bool:
        """Whether stored codes are bit-packed along the last axis: every width under 8 bits (int2..int7,
        fp4, nf4, ...), as a dense little-endian bitstream (see `qjax.numerics.packing`)."""
        return self.bits < 8

    @property
    def elements_per_byte(self) -> float:
        """Average elements per stored byte, 8 / bits (2.0 for int4, 8/3 for int3); 1.0 when unpacked.
        Not every byte holds a whole number of elements at 3/5/6/7 bits: use `storage_length` for sizes."""
        return 8 / self.bits if self.packed else 1.0

    def storage_length(self, n: int) -> int:
        """Stored bytes of n consecutive elements along the last axis: ceil(n * bits / 8) when packed."""
        return packed_length(n, self.bits) if self.packed else n * jnp.dtype(self.storage_dtype).itemsize

    def encode(self, v: jnp.ndarray) -> jnp.ndarray:
        """Map on-grid float values to stored codes (before packing)."""
        if self.kind == "int":
            return v.astype(self.storage_dtype)
        if self.kind == "float":
            return v.astype(self.storage_dtype)
        grid = jnp.asarray(self.grid, jnp.float32)
        code_of_sorted = jnp.asarray(_code_of_sorted(self), jnp.uint8)
        idx = jnp.clip(jnp.searchsorted(grid, v.astype(jnp.float32)), 0, grid.shape[0] - 1)
        return code_of_sorted[idx]

    def decode(self, codes: jnp.ndarray) -> jnp.ndarray:
        """Map stored codes (after unpacking) to float32 values."""
        if self.kind == "codebook":
            return jnp.asarray(self.codebook, jnp.float32)[codes.astype(jnp.int32)]
        return codes.astype(jnp.float32)

    def __repr__(self) -> str:
        return f"Format({self.name})"


@functools.cache
def _grid_cached(fmt: Format) -> np.ndarray:
    if fmt.kind == "int":
        return np.arange(fmt.qmin, fmt.qmax + 1, dtype=np.float64)
    if fmt.kind == "codebook":
        return np.unique(np.asarray(fmt.codebook, np.float64))
    # All finite values of the native minifloat type: enumerate its bit patterns.
    patterns = np.arange(2**fmt.bits, dtype=np.uint8)
    values = patterns.view(fmt.dtype).astype(np.float64)
    return np.unique(values[np.isfinite(values)])


def _grid(fmt: Format) -> np.ndarray:
    grid = _grid_cached(fmt)
    grid.flags.writeable = False
    return grid


@functools.cache
def _code_of_sorted(fmt: Format) -> np.ndarray:
    """For each value of the sorted grid, the code that stores it (the smallest such code)."""
    book = np.asarray(fmt.codebook, np.float64)
    return np.array([int(np.flatnonzero(book == v)[0]) for v in _grid(fmt)], np.uint8)


def _int(bits: int, signed: bool) -> Format:
    return Format(name=f"{'int' if signed else 'uint'}{bits}", kind="int", bits=bits, signed=signed)


# fp4 e2m1 (OCP MX): codes 0..7 are +{0, .5, 1, 1.5, 2, 3, 4, 6}, codes 8..15 the same negated.
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_CODEBOOK = _E2M1_MAGNITUDES + tuple(-m for m in _E2M1_MAGNITUDES)

# NF4 (QLoRA): quantiles of N(0, 1) normalised to [-1, 1], in ascending code order.
_NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

FORMATS: dict[str, Format] = {
    **{f"int{b}": _int(b, True) for b in range(2, 9)},
    **{f"uint{b}": _int(b, False) for b in range(2, 9)},
    "fp8_e4m3": Format("fp8_e4m3", "float", 8, dtype_name="float8_e4m3fn"),
    "fp8_e5m2": Format("fp8_e5m2", "float", 8, dtype_name="float8_e5m2"),
    "fp4_e2m1": Format("fp4_e2m1", "codebook", 4, dtype_name="float4_e2m1fn", codebook=_E2M1_CODEBOOK),
    "nf4": Format("nf4", "codebook", 4, codebook=_NF4_CODEBOOK),
}
_ALIASES = {"fp8": "fp8_e4m3", "e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2", "fp4": "fp4_e2m1", "e2m1": "fp4_e2m1"}


def get_format(fmt: Format | str) -> Format:
    """Resolve a format name ("int8", "uint4", "fp8_e4m3", "fp4", "nf4", ...) to its `Format`."""
    if isinstance(fmt, Format):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"format must be a Format or a name, got {type(fmt).__name__}")
    name = _ALIASES.get(fmt.lower(), fmt.lower())
    if name not in FORMATS:
        known = ", ".join(sorted(FORMATS) + sorted(_ALIASES))
        raise ValueError(f"unknown format {fmt!r}; known formats: {known}")
    return FORMATS[name]

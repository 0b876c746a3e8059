"""Sub-byte packing: codes of 1..8 bits stored densely in uint8 along the last axis.

Layout (one rule for every width): each row along the last axis is a little-endian bitstream. Code i
of the row occupies stream bits [i*bits, (i+1)*bits), and stream bit p is bit p % 8 (0 = least
significant) of byte p // 8. So

- 1/2/4 bits: codes never straddle a byte; the first code of a byte sits in its low bits (the layout
  of most int4 GEMM kernels; int4 [1, 2, 15, 0] -> bytes [0x21, 0x0F]). Unchanged from earlier qjax.
- 3/5/6/7 bits: codes straddle bytes; 8 codes of 3 bits fill exactly 3 bytes, e.g. the 3-bit codes
  [1, 2, 3, 4, 5, 6, 7, 0] -> bytes [0xD1, 0x58, 0x1F].
- 8 bits: one code per byte (no packing; the code's bit pattern as uint8).

A row of n codes takes `packed_length(n, bits) = ceil(n * bits / 8)` bytes; the unused high bits of the
last byte are zero. Codes are kept as their low `bits` bits (two's complement for signed codes) and
sign-extended again by `unpack(..., signed=True)`.

Implementation: the bitstream repeats every `8 / gcd(8, bits)` codes = `bits / gcd(8, bits)` bytes (a
"chunk": 8 codes → 3 bytes at 3 bits, 4 codes → 3 bytes at 6 bits, 2 codes → 1 byte at 4 bits). Rows
are zero-padded to whole chunks, and each byte of a chunk is the OR of the (statically known) shifted
codes that overlap it, so the work is a handful of whole-array uint8 shifts (jit-friendly; the only
Python loops run over the few positions inside one chunk, never over elements).
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def packed_length(n: int, bits: int) -> int:
    """Bytes that hold `n` codes of `bits` bits: ceil(n * bits / 8)."""
    return -(-n * bits // 8)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"packing needs an integer width of 1..8 bits per element, got {bits!r}")
    return bits


def _chunk(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte repeat of the bitstream."""
    g = math.gcd(8, bits)
    return 8 // g, bits // g


def _overlaps(bits: int):
    """(code k, byte j, shift) for every code/byte pair of a chunk that share bits.

    shift = k*bits - 8*j: how far left code k's bits lie from the start of byte j (negative: right)."""
    codes_per_chunk, bytes_per_chunk = _chunk(bits)
    for j in range(bytes_per_chunk):
        for k in range(codes_per_chunk):
            if k * bits < 8 * (j + 1) and 8 * j < (k + 1) * bits:
                yield k, j, k * bits - 8 * j


def _shift(u: jnp.ndarray, s: int) -> jnp.ndarray:
    """uint8 shift left by s (right by -s); bits shifted past bit 7 are dropped."""
    if s > 0:
        return u << jnp.uint8(s)
    if s < 0:
        return u >> jnp.uint8(-s)
    return u


def _pad_last(a: jnp.ndarray, to: int) -> jnp.ndarray:
    n = a.shape[-1]
    if to == n:
        return a
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, to - n)])


def pack(codes: jnp.ndarray, bits: int) -> jnp.ndarray:
    """Pack int8/uint8 codes (only their low `bits` bits are kept) into uint8 along the last axis.

    Output shape: codes.shape[:-1] + (packed_length(n, bits),). Layout: see the module docstring."""
    bits = _check_bits(bits)
    codes = jnp.asarray(codes)
    if codes.ndim == 0:
        raise ValueError("pack needs at least one axis (codes are packed along the last one)")
    lead, n = codes.shape[:-1], codes.shape[-1]
    u = codes.astype(jnp.uint8)
    if bits == 8:
        return u
    u = u & jnp.uint8((1 << bits) - 1)
    codes_per_chunk, bytes_per_chunk = _chunk(bits)
    n_chunks = -(-n // codes_per_chunk)
    u = _pad_last(u, n_chunks * codes_per_chunk).reshape(*lead, n_chunks, codes_per_chunk)
    out = [None] * bytes_per_chunk
    for k, j, s in _overlaps(bits):
        part = _shift(u[..., k], s)
        out[j] = part if out[j] is None else out[j] | part
    packed = jnp.stack(out, axis=-1).reshape(*lead, n_chunks * bytes_per_chunk)
    return packed[..., : packed_length(n, bits)]


def unpack(packed: jnp.ndarray, bits: int, n: int, signed: bool) -> jnp.ndarray:
    """Inverse of `pack`: the first `n` codes along the last axis, as int8 (sign-extended) or uint8."""
    bits = _check_bits(bits)
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"unpack needs uint8 bytes, got {packed.dtype}")
    need = packed_length(n, bits)
    if packed.ndim == 0 or packed.shape[-1] < need:
        got = "a scalar" if packed.ndim == 0 else f"{packed.shape[-1]} bytes"
        raise ValueError(f"{n} codes of {bits} bits need {need} bytes along the last axis, got {got}")
    lead = packed.shape[:-1]
    if bits == 8:
        u = packed[..., :n]
    else:
        codes_per_chunk, bytes_per_chunk = _chunk(bits)
        n_chunks = -(-n // codes_per_chunk)
        b = _pad_last(packed[..., :need], n_chunks * bytes_per_chunk).reshape(*lead, n_chunks, bytes_per_chunk)
        out = [None] * codes_per_chunk
        for k, j, s in _overlaps(bits):
            part = _shift(b[..., j], -s)
            out[k] = part if out[k] is None else out[k] | part
        mask = jnp.uint8((1 << bits) - 1)
        u = (jnp.stack(out, axis=-1) & mask).reshape(*lead, n_chunks * codes_per_chunk)[..., :n]
    if not signed:
        return u
    # Sign-extend: move the field to the top of an int8, then shift back arithmetically.
    return (u << jnp.uint8(8 - bits)).astype(jnp.int8) >> jnp.int8(8 - bits)

"""Sub-byte packing: several 1/2/4-bit codes per uint8 along the last axis.

Element i of a byte group goes to bits [i*bits, (i+1)*bits): the first element sits in the low bits
(the layout of most int4 GEMM kernels). The last axis is zero-padded to a whole number of bytes.
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def packed_length(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


def pack(codes: jnp.ndarray, bits: int) -> jnp.ndarray:
    """Pack int8/uint8 codes (only their low `bits` bits are kept) into uint8 along the last axis."""
    if bits not in (1, 2, 4):
        raise ValueError(f"packing needs 1, 2 or 4 bits per element, got {bits}")
    per_byte = 8 // bits
    n = codes.shape[-1]
    padded = packed_length(n, bits) * per_byte
    u = codes.astype(jnp.uint8) & jnp.uint8((1 << bits) - 1)
    if padded != n:
        u = jnp.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, padded - n)])
    u = u.reshape(*u.shape[:-1], padded // per_byte, per_byte)
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * jnp.uint8(bits)
    # Bit fields don't overlap, so a sum is an OR.
    return jnp.sum(u << shifts, axis=-1, dtype=jnp.uint8)


def unpack(packed: jnp.ndarray, bits: int, n: int, signed: bool) -> jnp.ndarray:
    """Inverse of `pack`: the first `n` codes along the last axis, as int8 (sign-extended) or uint8."""
    if bits not in (1, 2, 4):
        raise ValueError(f"unpacking needs 1, 2 or 4 bits per element, got {bits}")
    per_byte = 8 // bits
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * jnp.uint8(bits)
    u = (packed[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
    u = u.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)[..., :n]
    if not signed:
        return u
    # Sign-extend: move the field to the top of an int8, then shift back arithmetically.
    return (u << jnp.uint8(8 - bits)).astype(jnp.int8) >> jnp.int8(8 - bits)

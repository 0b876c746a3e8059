"""Bit packing for every width 1..8: layout, round trips, packed QArrays and their byte counts.

The reference layout is numpy's own little-endian bitstream (`np.packbits(..., bitorder="little")` of
each code's low `bits` bits, least significant first), independent of qjax's chunked implementation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qjax.numerics as qn
from qjax.numerics.packing import packed_length


def _random_codes(rng, bits, signed, shape):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return rng.integers(lo, hi + 1, size=shape).astype(np.int8 if signed else np.uint8)


def _np_bitstream(codes, bits):
    """The documented layout, computed with numpy: code i at stream bits [i*bits, (i+1)*bits)."""
    u = codes.astype(np.uint8)
    field = (u[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # (..., n, bits), low bit first
    stream = field.reshape(*codes.shape[:-1], codes.shape[-1] * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


@given(
    bits=st.integers(1, 8),
    signed=st.booleans(),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    n=st.integers(1, 67),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_bit_exact_and_matches_the_bitstream_layout(bits, signed, lead, n, seed):
    codes = _random_codes(np.random.default_rng(seed), bits, signed, (*lead, n))
    packed = qn.pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8
    assert packed.shape == (*lead, math.ceil(n * bits / 8))
    np.testing.assert_array_equal(np.asarray(packed), _np_bitstream(codes, bits))
    out = qn.unpack(packed, bits, n, signed)
    assert out.dtype == codes.dtype
    np.testing.assert_array_equal(np.asarray(out), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_width_covers_its_whole_range_at_every_position(bits):
    # All codes at every offset modulo the 8-code chunk, both signednesses, an odd row length.
    for signed in (False, True):
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        values = np.arange(lo, hi + 1)
        codes = np.stack([np.roll(values, s) for s in range(8)])[:, : len(values) - (len(values) > 2)]
        codes = codes.astype(np.int8 if signed else np.uint8)
        packed = qn.pack(jnp.asarray(codes), bits)
        n = codes.shape[-1]
        assert packed.shape[-1] == packed_length(n, bits) == -(-n * bits // 8)
        np.testing.assert_array_equal(np.asarray(qn.unpack(packed, bits, n, signed)), codes)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 64, 129])
@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_length_is_ceil_n_bits_over_8(bits, n):
    assert packed_length(n, bits) == math.ceil(n * bits / 8)
    packed = qn.pack(jnp.zeros((2, n), jnp.uint8), bits)
    assert packed.shape == (2, math.ceil(n * bits / 8))


def test_three_bit_hand_computed_example():
    # stream bits (LSB first): 100|010|110|001|101|011|111|000
    #   byte 0 = bits 0..7  = 1,0,0,0,1,0,1,1 -> 0b11010001 = 0xD1
    #   byte 1 = bits 8..15 = 0,0,0,1,1,0,1,0 -> 0b01011000 = 0x58
    #   byte 2 = bits 16..23 = 1,1,1,1,1,0,0,0 -> 0b00011111 = 0x1F
    codes = jnp.asarray([1, 2, 3, 4, 5, 6, 7, 0], jnp.uint8)
    packed = qn.pack(codes, 3)
    np.testing.assert_array_equal(np.asarray(packed), np.array([0xD1, 0x58, 0x1F], np.uint8))
    np.testing.assert_array_equal(np.asarray(qn.unpack(packed, 3, 8, signed=False)), np.asarray(codes))
    # As signed int3 the same bytes hold [1, 2, 3, -4, -3, -2, -1, 0].
    np.testing.assert_array_equal(np.asarray(qn.unpack(packed, 3, 8, signed=True)), [1, 2, 3, -4, -3, -2, -1, 0])


def test_one_two_four_bit_layout_is_unchanged():
    np.testing.assert_array_equal(np.asarray(qn.pack(jnp.asarray([1, 2, 15, 0], jnp.uint8), 4)), [0x21, 0x0F])
    np.testing.assert_array_equal(np.asarray(qn.pack(jnp.asarray([1, 2, 3, 0, 3], jnp.uint8), 2)), [0x39, 0x03])
    np.testing.assert_array_equal(np.asarray(qn.pack(jnp.asarray([1, 0, 0, 1, 1, 1, 1, 1, 1], jnp.uint8), 1)), [0xF9, 0x01])
    # int4 -1, -8 -> nibbles 0xF, 0x8, low first (what the Pallas int4 kernels read).
    np.testing.assert_array_equal(np.asarray(qn.pack(jnp.asarray([-1, -8], jnp.int8), 4)), [0x8F])


def test_five_six_seven_bit_hand_computed_examples():
    # 5 bits: [31, 1] -> stream 11111|10000 -> bytes 0b00111111, 0b00000000 -> 0x3F, 0x00
    np.testing.assert_array_equal(np.asarray(qn.pack(jnp.asarray([31, 1], jnp.uint8), 5)), [0x3F, 0x00])
    # 6 bits: [1, 2, 3, 63] -> 1 | 2<<6 | 3<<12 | 63<<18 = 0xFC3081 -> bytes 0x81, 0x30, 0xFC
    np.testing.assert_array_equal(np.asarray(qn.pack(jnp.asarray([1, 2, 3, 63], jnp.uint8), 6)), [0x81, 0x30, 0xFC])
    # 7 bits: [127, 0, 1] -> 127 | 0<<7 | 1<<14 = 0x407F -> bytes 0x7F, 0x40, 0x00
    np.testing.assert_array_equal(np.asarray(qn.pack(jnp.asarray([127, 0, 1], jnp.uint8), 7)), [0x7F, 0x40, 0x00])


def test_packing_only_keeps_the_low_bits_and_rejects_bad_widths():
    # Out-of-range codes are truncated to their low bits, never spill into the neighbours.
    packed = qn.pack(jnp.asarray([0xFF, 0, 0xFF], jnp.uint8), 3)
    np.testing.assert_array_equal(np.asarray(qn.unpack(packed, 3, 3, signed=False)), [7, 0, 7])
    for bad in (0, 9, 3.0):
        with pytest.raises(ValueError, match="1..8"):
            qn.pack(jnp.zeros(4, jnp.uint8), bad)
    with pytest.raises(ValueError, match="need 4 bytes"):
        qn.unpack(jnp.zeros(3, jnp.uint8), 3, 10, signed=False)


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 7])
def test_pack_and_unpack_work_under_jit(bits):
    codes = _random_codes(np.random.default_rng(bits), bits, True, (4, 3, 29))
    pk = jax.jit(qn.pack, static_argnums=1)(jnp.asarray(codes), bits)
    np.testing.assert_array_equal(np.asarray(pk), _np_bitstream(codes, bits))
    roundtrip = jax.jit(lambda c: qn.unpack(qn.pack(c, bits), bits, c.shape[-1], True))
    np.testing.assert_array_equal(np.asarray(roundtrip(jnp.asarray(codes))), codes)


# ---- packed QArrays -----------------------------------------------------------------------------


def test_every_sub_byte_format_is_packed():
    for name, fmt in qn.FORMATS.items():
        assert fmt.packed == (fmt.bits < 8), name
        assert fmt.storage_length(37) == (math.ceil(37 * fmt.bits / 8) if fmt.bits < 8 else 37), name
    assert qn.get_format("int4").elements_per_byte == 2
    assert qn.get_format("int3").elements_per_byte == pytest.approx(8 / 3)
    assert qn.get_format("int8").elements_per_byte == 1


def _np_expand(a, tiles, padded):
    a = np.asarray(a)
    for axis, t in enumerate(tiles):
        a = np.repeat(a, t, axis=axis)
    return a[tuple(slice(0, d) for d in padded)]


def _expected_nbytes(q):
    padded = q.padded_shape
    codes = math.prod(padded[:-1]) * math.ceil(padded[-1] * q.format.bits / 8)
    scales = math.prod(q.scale_shape) * jnp.dtype(q.scale.dtype).itemsize
    zps = 0 if q.zero_point is None else math.prod(q.scale_shape) * 1
    return codes + scales + zps


CASES = [
    ("int3", "g0", True), ("int3", "g1", False), ("uint3", "ch", False),
    ("int5", "g1", True), ("uint5", "g0", False), ("int6", "ch", True),
    ("int6", "g1", False), ("uint6", "g1", True), ("int7", "g0", True), ("int2", "g1", False),
]  # fmt: skip


@pytest.mark.parametrize("fmt,gran,symmetric", CASES)
def test_quantize_dequantize_matches_an_unpacked_numpy_reference(fmt, gran, symmetric):
    rng = np.random.default_rng(sum(map(ord, fmt + gran)) + symmetric)
    x = (rng.standard_normal((6, 45)) * 2).astype(np.float32)  # odd widths: padding and partial bytes
    if fmt.startswith("u") and symmetric:
        x = np.abs(x)
    granularity = {"g0": qn.per_group(0, 4), "g1": qn.per_group(1, 8), "ch": qn.per_axis(0)}[gran]
    q = qn.quantize(jnp.asarray(x), qn.QuantSpec(fmt, granularity, symmetric=symmetric))
    f = q.format
    padded = q.padded_shape

    # Stored bytes: ceil(padded_cols * bits / 8) per row, and nbytes is exactly the formula.
    assert q.values.dtype == jnp.uint8
    assert q.values.shape == (*padded[:-1], math.ceil(padded[-1] * f.bits / 8))
    assert q.nbytes == _expected_nbytes(q)
    if q.zero_point is not None:  # zero points: one byte each, in the format's own signedness
        assert q.zero_point.dtype == (jnp.int8 if f.signed else jnp.uint8)
        assert int(jnp.min(q.zero_point)) >= f.qmin and int(jnp.max(q.zero_point)) <= f.qmax

    # numpy reference with q's scale/zero point: round half to even, clip, codes unpacked.
    xp = np.zeros(padded, np.float32)
    xp[: x.shape[0], : x.shape[1]] = x
    s = _np_expand(np.asarray(q.scale, np.float32), q.tiles, padded)
    z = 0 if q.zero_point is None else _np_expand(np.asarray(q.zero_point, np.float32), q.tiles, padded)
    ref_codes = np.clip(np.round(xp / s + z), f.qmin, f.qmax)
    codes = np.asarray(q.codes())
    assert codes.dtype == (np.int8 if f.signed else np.uint8) and codes.shape == padded
    np.testing.assert_array_equal(codes[: x.shape[0], : x.shape[1]], ref_codes[: x.shape[0], : x.shape[1]])
    ref = ((ref_codes - z) * s)[: x.shape[0], : x.shape[1]]
    np.testing.assert_allclose(np.asarray(q.dequantize()), ref, rtol=1e-6, atol=1e-7)
    # ... and equals qjax's own unpacked path (fake quantization never packs).
    spec = qn.QuantSpec(fmt, granularity, symmetric=symmetric)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(qn.quantize_dequantize(jnp.asarray(x), spec)))


def test_w3_group128_nbytes_is_three_eighths_of_a_byte_per_weight():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((256, 512)), jnp.float32)
    nbytes = {f: qn.quantize(x, qn.QuantSpec(f, qn.per_group(0, 128))).nbytes for f in ("int3", "int5", "int6", "int7", "int8")}
    scales = 2 * 512 * 4
    assert nbytes == {f: 256 * 512 * b // 8 + scales for f, b in (("int3", 3), ("int5", 5), ("int6", 6), ("int7", 7), ("int8", 8))}
    q = qn.quantize(x[:, :13], qn.QuantSpec("uint6", qn.per_axis(0), symmetric=False))
    assert q.nbytes == 256 * math.ceil(13 * 6 / 8) + 256 * 4 + 256 * 1


@pytest.mark.parametrize("fmt", ["int3", "uint5", "int6", "int7"])
def test_quantize_and_dequantize_work_under_jit(fmt):
    x = jnp.asarray(np.random.default_rng(7).standard_normal((5, 37)), jnp.float32)
    spec = qn.QuantSpec(fmt, qn.per_group(1, 8), symmetric=not fmt.startswith("u"))
    eager = qn.quantize(x, spec)
    jitted = jax.jit(lambda a: qn.quantize(a, spec))(x)
    np.testing.assert_array_equal(np.asarray(jitted.values), np.asarray(eager.values))
    assert jitted.nbytes == eager.nbytes == _expected_nbytes(eager)
    out = jax.jit(lambda a: qn.quantize(a, spec).dequantize())(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(eager.dequantize()))

"""Numerics: formats, granularity, rounding, packing, QArray, gradients — against numpy references."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qjax.numerics as qn

INT_FORMATS = [f"{s}int{b}" for b in range(2, 9) for s in ("", "u")]


def _np_tiles_expand(scale, tiles, shape):
    """Per-element view of a per-tile array, computed with numpy (independent of qjax's tiling)."""
    s = np.asarray(scale, np.float64)
    for axis, t in enumerate(tiles):
        s = np.repeat(s, t, axis=axis)
    return s[tuple(slice(0, d) for d in shape)]


granularities = st.sampled_from(["tensor", "axis0", "axis1", "group", "block"])


def _granularity(kind, group):
    return {
        "tensor": qn.per_tensor(),
        "axis0": qn.per_axis(0),
        "axis1": qn.per_axis(1),
        "group": qn.per_group(1, group),
        "block": qn.per_block((3, group)),
    }[kind]


@given(
    fmt=st.sampled_from(INT_FORMATS),
    kind=granularities,
    group=st.integers(1, 40),
    symmetric=st.booleans(),
    rows=st.integers(1, 7),
    cols=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
def test_int_roundtrip_error_is_at_most_half_a_step(fmt, kind, group, symmetric, rows, cols, seed):
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 3
    if fmt.startswith("u") and symmetric:
        x = np.abs(x)
    spec = qn.QuantSpec(fmt, _granularity(kind, group), symmetric=symmetric)
    q = qn.quantize(jnp.asarray(x), spec)
    assert q.shape == x.shape
    err = np.abs(np.asarray(q.dequantize(), np.float64) - x)
    step = _np_tiles_expand(q.scale, q.tiles, x.shape)
    assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-7)


def test_int8_per_channel_matches_hand_computation():
    x = np.array([[1.0, -2.0, 0.5], [0.1, 0.2, -0.4]], np.float32)
    q = qn.quantize(jnp.asarray(x), qn.QuantSpec("int8", qn.per_axis(0)))
    scales = np.array([2.0 / 127, 0.4 / 127], np.float32)
    np.testing.assert_allclose(np.asarray(q.scale)[:, 0], scales, rtol=1e-7)
    expected = np.round(x / scales[:, None]).astype(np.int8)
    np.testing.assert_array_equal(np.asarray(q.codes()), expected)


def test_asymmetric_uint4_matches_gptq_style_formula():
    x = np.array([[-1.0, 0.0, 2.1, 3.0]], np.float32)
    q = qn.quantize(jnp.asarray(x), qn.QuantSpec("uint4", qn.per_axis(0), symmetric=False))
    scale = 4.0 / 15
    zero = np.round(0 - (-1.0) / scale)
    np.testing.assert_allclose(float(q.scale[0, 0]), scale, rtol=1e-6)
    assert int(q.zero_point[0, 0]) == zero
    np.testing.assert_array_equal(np.asarray(q.codes())[0], np.clip(np.round(x[0] / scale) + zero, 0, 15))


@pytest.mark.parametrize("fmt,dtype", [("fp8_e4m3", ml_dtypes.float8_e4m3fn), ("fp8_e5m2", ml_dtypes.float8_e5m2),
                                       ("fp4_e2m1", ml_dtypes.float4_e2m1fn)])  # fmt: skip
def test_float_rounding_matches_ml_dtypes_casts(fmt, dtype):
    f = qn.get_format(fmt)
    rng = np.random.default_rng(0)
    m = float(ml_dtypes.finfo(dtype).max)
    v = np.concatenate([rng.uniform(-m, m, 4000), rng.standard_normal(2000) * 0.01,
                        np.asarray(f.grid), (np.asarray(f.grid)[1:] + np.asarray(f.grid)[:-1]) / 2]).astype(np.float32)  # fmt: skip
    ours = np.asarray(qn.round_to_grid(jnp.asarray(v), f))
    theirs = v.astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(ours, theirs)


def test_fp8_quantize_is_the_ml_dtypes_cast_of_the_scaled_tensor():
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    q = qn.quantize(jnp.asarray(x), qn.QuantSpec("fp8_e4m3", qn.per_axis(0)))
    s = np.abs(x).max(axis=1, keepdims=True) / 448.0
    expected = (x / s).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s
    np.testing.assert_allclose(np.asarray(q.dequantize()), expected, rtol=1e-6)
    assert q.values.dtype == jnp.float8_e4m3fn


def test_nf4_rounds_to_the_nearest_codebook_value():
    f = qn.get_format("nf4")
    v = np.random.default_rng(2).uniform(-1.2, 1.2, 5000).astype(np.float32)
    book = np.asarray(f.codebook)
    expected = book[np.argmin(np.abs(v[:, None] - book[None, :]), axis=1)]
    np.testing.assert_allclose(np.asarray(qn.round_to_grid(jnp.asarray(v), f)), expected, rtol=0, atol=1e-7)


@given(bits=st.sampled_from([1, 2, 4]), signed=st.booleans(), n=st.integers(1, 67), seed=st.integers(0, 999))
def test_packing_roundtrips_bit_exactly(bits, signed, n, seed):
    rng = np.random.default_rng(seed)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    codes = rng.integers(lo, hi + 1, size=(3, n)).astype(np.int8 if signed else np.uint8)
    packed = qn.pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, -(-n * bits // 8))
    np.testing.assert_array_equal(np.asarray(qn.unpack(packed, bits, n, signed)), codes)


def test_packing_layout_low_nibble_first():
    packed = qn.pack(jnp.asarray([1, 2, 15, 0], jnp.uint8), 4)
    np.testing.assert_array_equal(np.asarray(packed), [0x21, 0x0F])


@pytest.mark.parametrize("fmt", ["int4", "uint8", "fp8_e4m3", "fp4_e2m1", "nf4"])
def test_stochastic_rounding_is_unbiased(fmt):
    f = qn.get_format(fmt)
    grid = np.asarray(f.grid)
    rng = np.random.default_rng(3)
    v = rng.uniform(grid[0], grid[-1], 64).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), 4000)
    samples = jax.vmap(lambda k: qn.round_to_grid(jnp.asarray(v), f, "stochastic", k))(keys)
    samples = np.asarray(samples)
    assert np.all(np.isin(samples, grid.astype(np.float32)))
    # Each sample lies on one of the two neighbours of v; the mean converges to v.
    lo = grid[np.clip(np.searchsorted(grid, v, side="right") - 1, 0, len(grid) - 2)]
    hi = grid[np.clip(np.searchsorted(grid, v, side="right"), 1, len(grid) - 1)]
    sd = (hi - lo) / 2 / np.sqrt(len(keys))
    assert np.all(np.abs(samples.mean(0) - v) <= 5 * sd + 1e-6)


def test_stochastic_rounding_needs_a_key():
    with pytest.raises(ValueError, match="key"):
        qn.quantize(jnp.ones(4), qn.QuantSpec("int8", rounding="stochastic"))


def test_int4_nbytes_is_about_half_of_int8():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((256, 512)), jnp.float32)
    n8 = qn.quantize(x, qn.QuantSpec("int8", qn.per_group(0, 128))).nbytes
    n4 = qn.quantize(x, qn.QuantSpec("int4", qn.per_group(0, 128))).nbytes
    n2 = qn.quantize(x, qn.QuantSpec("int2", qn.per_group(0, 128))).nbytes
    assert n8 == 256 * 512 + 2 * 512 * 4
    assert n4 == 256 * 512 // 2 + 2 * 512 * 4
    assert n2 == 256 * 512 // 4 + 2 * 512 * 4
    assert abs(qn.quantize(x, qn.mxfp4()).bits_per_element - 4.25) < 1e-9


def test_microscaling_uses_power_of_two_scales_per_32():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((8, 96)) * 10, jnp.float32)
    for spec, emax in ((qn.mxfp8(), 8), (qn.mxfp4(), 2)):
        q = qn.quantize(x, spec)
        s = np.asarray(q.scale.astype(jnp.float32))
        assert q.scale.dtype == jnp.float8_e8m0fnu and s.shape == (8, 3)
        np.testing.assert_array_equal(np.log2(s), np.round(np.log2(s)))
        amax = np.abs(np.asarray(x)).reshape(8, 3, 32).max(-1)
        np.testing.assert_array_equal(np.log2(s), np.floor(np.log2(amax)) - emax)


def test_non_dividing_groups_are_padded_and_shape_is_kept():
    x = jnp.asarray(np.random.default_rng(6).standard_normal((5, 100)), jnp.float32)
    q = qn.quantize(x, qn.QuantSpec("int4", qn.per_block((2, 48))))
    assert q.shape == (5, 100) and q.padded_shape == (6, 144) and q.scale.shape == (3, 3)
    assert q.dequantize().shape == (5, 100)


# ---- gradients --------------------------------------------------------------------------------------


def test_ste_gradient_is_identity():
    x = jnp.asarray(np.random.default_rng(7).standard_normal((4, 33)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(8).standard_normal((4, 33)), jnp.float32)
    g = jax.grad(lambda x: jnp.sum(w * qn.fake_quant(x, qn.QuantSpec("int4", qn.per_group(1, 16)))))(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_clipped_ste_gradient_zero_outside_the_clip_range():
    x = np.random.default_rng(9).standard_normal((3, 40)).astype(np.float32)
    spec = qn.QuantSpec("int8", qn.per_axis(0), clip_ratio=0.6)
    g = jax.grad(lambda x: jnp.sum(qn.fake_quant(x, spec, gradient="clipped_ste")))(jnp.asarray(x))
    v = x / (0.6 * np.abs(x).max(axis=1, keepdims=True) / 127)
    expected = ((v >= -128) & (v <= 127)).astype(np.float32)  # not saturated by int8's grid
    np.testing.assert_array_equal(np.asarray(g), expected)
    assert 0 < expected.mean() < 1


def test_lsq_gradients_match_the_analytic_formula():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 50)).astype(np.float32)
    spec = qn.QuantSpec("int4", qn.per_axis(0))
    s = np.array([[0.3], [0.1]], np.float32)
    gx, gs = jax.grad(lambda x, s: jnp.sum(qn.lsq_fake_quant(x, s, spec, grad_scale=1.0)), argnums=(0, 1))(x, s)
    v = x / s
    q = np.clip(np.round(v), -8, 7)
    inside = (v >= -8) & (v <= 7)
    np.testing.assert_array_equal(np.asarray(gx), inside.astype(np.float32))
    np.testing.assert_allclose(np.asarray(gs), np.where(inside, q - v, q).sum(1, keepdims=True), rtol=1e-5, atol=1e-5)


def test_lsq_scale_learns_with_optax():
    import optax

    x = jnp.asarray(np.random.default_rng(11).standard_normal((64, 64)), jnp.float32)
    spec = qn.QuantSpec("int4", qn.per_axis(0))
    loss = lambda s: jnp.mean((qn.lsq_fake_quant(x, s, spec) - x) ** 2)  # noqa: E731
    s = qn.init_lsq_scale(x, spec) * 3  # a poor start
    opt = optax.adam(1e-2)
    state = opt.init(s)
    start = loss(s)
    for _ in range(100):
        g = jax.grad(loss)(s)
        upd, state = opt.update(g, state)
        s = optax.apply_updates(s, upd)
    assert loss(s) < 0.5 * start


# ---- bad input ---------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    x = jnp.ones((4, 8))
    with pytest.raises(ValueError, match="group size must be a positive"):
        qn.per_group(1, 0)
    with pytest.raises(ValueError, match="positive"):
        qn.per_block((2, -3))
    with pytest.raises(ValueError, match="axis 5 is out of range"):
        qn.quantize(x, qn.QuantSpec("int8", qn.per_axis(5)))
    with pytest.raises(TypeError, match="floating-point"):
        qn.quantize(jnp.ones((4, 8), jnp.int32), qn.QuantSpec("int8"))
    with pytest.raises(ValueError, match="NaN/Inf"):
        qn.quantize(x.at[0, 0].set(jnp.nan), qn.QuantSpec("int8"))
    with pytest.raises(ValueError, match="NaN/Inf"):
        qn.fake_quant(x.at[1, 1].set(jnp.inf), qn.QuantSpec("int8"))
    with pytest.raises(ValueError, match="unknown format 'int9'"):
        qn.QuantSpec("int9")
    with pytest.raises(ValueError, match="clip_ratio"):
        qn.QuantSpec("int8", clip_ratio=1.5)
    with pytest.raises(ValueError, match="integer format"):
        qn.QuantSpec("fp8", symmetric=False)


def test_quantize_works_under_jit_and_vmap():
    x = jnp.asarray(np.random.default_rng(12).standard_normal((3, 4, 32)), jnp.float32)
    spec = qn.QuantSpec("int4", qn.per_group(-1, 8))
    eager = qn.quantize_dequantize(x, spec)
    jitted = jax.jit(lambda x: qn.quantize(x, spec).dequantize())(x)
    vmapped = jax.vmap(lambda x: qn.fake_quant(x, spec))(x)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(vmapped))

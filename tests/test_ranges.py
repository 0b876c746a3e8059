"""Scales from ranges (`scale_from_range`) and range calibrators (`qjax.numerics.ranges`) against float64 numpy."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import qjax
import qjax.numerics as qn
from qjax.numerics import ranges as R
from qjax.transforms import calibration

RNG = np.random.default_rng(0)


def _observed(x: np.ndarray, spec: qn.QuantSpec) -> dict:
    stats = calibration.init_stats(calibration.stat_shape(spec, x.shape[-1]))
    return calibration.observe(stats, jnp.asarray(x), "minmax")


# ---- one scale rule ------------------------------------------------------------------------------------

SPECS = {
    "int8 tensor": qn.QuantSpec("int8"),
    "int8 feature": qn.QuantSpec("int8", qn.per_axis(-1)),
    "int8 clip bf16": qn.QuantSpec("int8", qn.per_axis(-1), clip_ratio=0.9, scale_dtype="bfloat16"),
    "uint8 asym fp16": qn.QuantSpec("uint8", qn.per_axis(-1), symmetric=False, scale_dtype="float16"),
    "e4m3 pow2": qn.QuantSpec("fp8_e4m3", scale_mode="pow2"),
    "e2m1 pow2 feature": qn.QuantSpec("fp4_e2m1", qn.per_axis(-1), scale_mode="pow2"),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_static_scale_from_stats_equals_dynamic_scale_of_the_same_data(name):
    spec = SPECS[name]
    x = (RNG.standard_normal((4, 32, 16)) * RNG.uniform(0.01, 50, 16) + 0.3).astype(np.float32)
    static, static_zp = calibration.scale_from_stats(_observed(x, spec), spec)
    dynamic, dynamic_zp = qn.compute_scale(jnp.asarray(x), spec)
    assert static.dtype == dynamic.dtype
    np.testing.assert_array_equal(np.asarray(static, np.float32), np.asarray(dynamic, np.float32).reshape(static.shape))
    if dynamic_zp is None:
        assert static_zp is None
    else:
        np.testing.assert_array_equal(np.asarray(static_zp), np.asarray(dynamic_zp).reshape(static_zp.shape))


@pytest.mark.parametrize("fmt, emax", [("fp8_e4m3", 8), ("fp4_e2m1", 2)])
def test_static_mx_activation_scale_is_a_power_of_two_stored_as_e8m0(fmt, emax):
    spec = qn.QuantSpec(fmt, qn.per_axis(-1), scale_mode="pow2")
    x = (RNG.standard_normal((64, 8)) * np.geomspace(1e-3, 1e3, 8)).astype(np.float32)
    scale, zp = calibration.scale_from_stats(_observed(x, spec), spec)
    assert zp is None and scale.dtype == jnp.float8_e8m0fnu and scale.shape == (8,)
    s = np.asarray(scale, np.float64)
    np.testing.assert_array_equal(np.log2(s), np.round(np.log2(s)))  # powers of two
    amax = np.abs(x.astype(np.float64)).max(0)
    np.testing.assert_array_equal(s, 2.0 ** (np.floor(np.log2(amax)) - emax))


def test_calibration_honours_scale_dtype():
    x = RNG.standard_normal((64, 8)).astype(np.float32) * 3
    for dtype in ("bfloat16", "float16"):
        for symmetric, fmt in ((True, "int8"), (False, "uint8")):
            spec = qn.QuantSpec(fmt, qn.per_axis(-1), symmetric=symmetric, scale_dtype=dtype)
            scale, _ = calibration.scale_from_stats(_observed(x, spec), spec)
            assert scale.dtype == jnp.dtype(dtype)


def test_static_mx_activation_scale_end_to_end_in_nnx():
    class Net(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(16, 8, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.lin(x)

    act = qn.QuantSpec("fp8_e4m3", scale_mode="pow2")
    rule = qjax.Rule("lin", weight=qn.QuantSpec("int8", qn.per_axis(1)), act=act, static_act=True)
    x = jnp.asarray(RNG.standard_normal((4, 16)) * 10, jnp.float32)
    cal = qjax.quantize(Net(), [rule], "calibrate")
    cal(x)
    served = qjax.quantize(cal, [rule], "serve")
    scale = served.lin.act_scale.get_value()["scale"]
    assert scale.dtype == jnp.float8_e8m0fnu
    assert float(scale) == 2.0 ** (np.floor(np.log2(np.abs(np.asarray(x, np.float64)).max())) - 8)
    assert np.isfinite(np.asarray(served(x))).all()


# ---- histograms and percentiles -------------------------------------------------------------------------


def test_histogram_counts_equal_numpy_histogram():
    x = RNG.standard_normal((50, 40, 6)).astype(np.float32) * np.array([1, 2, 3, 0.5, 5, 1], np.float32)
    a = np.abs(x.astype(np.float64))
    # per tensor, accumulated over two batches; amax = 8 makes the edges exact in float32 and float64
    h = R.histogram_init((), 256)
    h = R.histogram_update(R.histogram_update(h, jnp.asarray(x[:20]), 8.0), jnp.asarray(x[20:]), 8.0)
    clipped = np.minimum(a, 8.0)  # values beyond amax belong to the last bin
    np.testing.assert_array_equal(np.asarray(h.counts), np.histogram(clipped, 256, range=(0, 8.0))[0])
    # per feature, each with its own amax (smaller than some values: they land in the last bin)
    amax = np.array([2, 4, 4, 1, 8, 2], np.float32)
    hf = R.histogram_update(R.histogram_init((6,), 128), jnp.asarray(x), jnp.asarray(amax))
    for f in range(6):
        ref = np.histogram(np.minimum(a[..., f], amax[f]), 128, range=(0, float(amax[f])))[0]
        np.testing.assert_array_equal(np.asarray(hf.counts[f]), ref)
    # amax from the data itself (edges not exact in float32): at most a value or two on an edge differ
    m = float(a.max())
    hm = R.histogram_update(R.histogram_init((), 2048), jnp.asarray(x), m)
    assert np.abs(np.asarray(hm.counts) - np.histogram(a, 2048, range=(0, m))[0]).sum() <= 4


@pytest.mark.parametrize("p", [50.0, 90.0, 99.0, 99.9, 99.99])
def test_percentile_is_numpy_percentile_within_a_bin(p):
    x = np.random.default_rng(7).standard_normal((400, 250)).astype(np.float32)  # own generator: order-independent
    a = np.abs(x.astype(np.float64))
    h = R.histogram_update(R.histogram_init((), 2048), jnp.asarray(x), float(a.max()))
    width = a.max() / 2048
    assert abs(float(R.percentile_range(h, p)) - np.percentile(a, p)) <= width
    if p <= 99.9:  # coarse bins, dense data: interpolating within the bin gets far closer than a bin
        coarse = R.histogram_update(R.histogram_init((), 64), jnp.asarray(x), float(a.max()))
        assert abs(float(R.percentile_range(coarse, p)) - np.percentile(a, p)) <= 0.1 * a.max() / 64
    # per feature, 25k samples each: at 99.99 only 2-3 lie above, numpy's (n-1) convention interpolates
    # between order statistics that are bins apart, and "within a bin" is no longer a meaningful claim
    if p > 99.9:
        return
    x = x.reshape(-1, 4)
    a = np.abs(x.astype(np.float64))
    hf = R.histogram_update(R.histogram_init((4,), 512), jnp.asarray(x), jnp.asarray(a.max(0), jnp.float32))
    got = np.asarray(R.percentile_range(hf, p))
    assert (np.abs(got - np.percentile(a, p, axis=0)) <= a.max(0) / 512).all()


# ---- KL (entropy) calibration ---------------------------------------------------------------------------


def _np_kl_divergences(counts: np.ndarray, levels: int) -> np.ndarray:
    """TensorRT entropy calibration, loop by loop in float64: KL(P‖Q) for every candidate i = levels..bins."""
    counts = counts.astype(np.float64)
    out = []
    for i in range(levels, len(counts) + 1):
        p = counts[:i].copy()
        p[i - 1] += counts[i:].sum()
        nonzero = p != 0
        width = i // levels
        q = np.zeros(i)
        for j in range(levels):
            start, stop = j * width, (i if j == levels - 1 else (j + 1) * width)
            n = nonzero[start:stop].sum()
            if n:
                q[start:stop] = counts[start:stop].sum() / n
        q[~nonzero] = 0
        p, q = p / p.sum(), q / q.sum()
        with np.errstate(divide="ignore"):
            out.append(np.sum(p[nonzero] * np.log(p[nonzero] / q[nonzero])))
    return np.array(out)


def _laplace_with_outliers(n=100_000, outliers=5, at=100.0):
    x = RNG.laplace(size=n).astype(np.float32)
    x[:outliers] = at * np.sign(x[:outliers])
    return x


def _int8_error(x, t):
    spec = qn.QuantSpec("int8")
    scale, _ = qn.scale_from_range(-t, t, spec)
    x_hat = qn.quantize_dequantize(jnp.asarray(x), spec, scale=jnp.reshape(scale, (1,)))
    return np.asarray(x_hat, np.float64) - x


def test_kl_threshold_minimises_the_numpy_reference_divergence():
    x = _laplace_with_outliers(20_000, 3, at=25.0)
    h = R.histogram_update(R.histogram_init((), 512), jnp.asarray(x), float(np.abs(x).max()))
    kl = _np_kl_divergences(np.asarray(h.counts), 128)
    i = round(float(R.kl_range(h, 128)) / float(h.amax) * 512)
    assert np.isfinite(kl.min()) and kl[i - 128] <= kl.min() * (1 + 1e-4)
    assert kl.argmin() < len(kl) // 2  # the reference itself clips hard here, so the check has teeth


def test_kl_clips_heavy_tails_but_not_uniform_data():
    x = _laplace_with_outliers()
    amax = float(np.abs(x).max())
    t = float(R.kl_range(R.histogram_update(R.histogram_init((), 2048), jnp.asarray(x), amax), qn.QuantSpec("int8")))
    assert t < 0.25 * amax
    bulk = slice(5, None)  # the Laplace values: min-max spends the grid on the 5 outliers
    assert np.mean(_int8_error(x, t)[bulk] ** 2) < 0.1 * np.mean(_int8_error(x, amax)[bulk] ** 2)
    lap = RNG.laplace(size=100_000).astype(np.float32)  # no injected outliers: total error still improves
    h = R.histogram_update(R.histogram_init((), 2048), jnp.asarray(lap), float(np.abs(lap).max()))
    assert np.mean(_int8_error(lap, R.kl_range(h, 128)) ** 2) < np.mean(_int8_error(lap, h.amax) ** 2)
    u = RNG.uniform(-1, 1, 100_000).astype(np.float32)
    hu = R.histogram_update(R.histogram_init((), 2048), jnp.asarray(u), float(np.abs(u).max()))
    assert float(R.kl_range(hu, 128)) >= 0.98 * float(hu.amax)


def test_format_levels():
    assert [R.format_levels(f) for f in ("int8", "int4", "uint8", "fp8_e4m3", "fp4_e2m1", "nf4")] == [128, 8, 256, 126, 7, 8]


# ---- MSE ------------------------------------------------------------------------------------------------


def _np_fake_quant(t: np.ndarray, lo: np.float32, hi: np.float32, fmt: str, symmetric: bool) -> np.ndarray:
    """Float64 fake quantization of one tile with range [lo, hi] (scale arithmetic in float32, as stored)."""
    f = qn.get_format(fmt)
    t32 = t.astype(np.float32)
    if symmetric:
        a = max(-lo, hi)
        s = np.float32(a / np.float32(f.max_value)) if a > 0 else np.float32(1)
        if f.kind == "int":
            q = np.clip(np.round(t32 / s), f.qmin, f.qmax)
        else:
            q = np.clip(t32 / s, -f.max_value, f.max_value).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
        return q * np.float64(s)
    s = np.float32((hi - lo) / np.float32(f.qmax - f.qmin)) if hi > lo else np.float32(1)
    zp = np.clip(np.round(f.qmin - lo / s), f.qmin, f.qmax)
    return (np.clip(np.round(np.float32(t32 / s + np.float32(zp))), f.qmin, f.qmax) - zp) * np.float64(s)


def _np_clip_search(tile: np.ndarray, fmt: str, symmetric: bool, grid: int, min_ratio: float):
    ratios = (1.0 - np.arange(int(round((1 - min_ratio) * grid)) + 1) / grid).astype(np.float32)
    lo, hi = np.float32(min(tile.min(), 0)), np.float32(max(tile.max(), 0))
    errs = [np.sum((_np_fake_quant(tile, lo * r, hi * r, fmt, symmetric) - tile) ** 2) for r in ratios]
    return np.array(errs)


MSE_CASES = {
    "int4 channel": (qn.QuantSpec("int4", qn.per_axis(1)), "int4", True),
    "int3 group32": (qn.QuantSpec("int3", qn.per_group(0, 32)), "int3", True),
    "uint4 asym group32": (qn.QuantSpec("uint4", qn.per_group(0, 32), symmetric=False), "uint4", False),
    "e4m3 channel": (qn.QuantSpec("fp8_e4m3", qn.per_axis(1)), "fp8_e4m3", True),
}


@pytest.mark.parametrize("name", list(MSE_CASES))
def test_mse_clip_search_beats_absmax_and_equals_brute_force(name):
    spec, fmt, symmetric = MSE_CASES[name]
    w = (RNG.standard_t(3, size=(96, 12)) * RNG.uniform(0.1, 2, 12)).astype(np.float32)
    scale, zp = R.mse_clip_search(jnp.asarray(w), spec, grid=50, min_ratio=0.3)
    w_hat = np.asarray(qn.quantize(jnp.asarray(w), spec, scale=scale, zero_point=zp).dequantize(), np.float64)
    absmax = np.asarray(qn.quantize(jnp.asarray(w), spec).dequantize(), np.float64)
    group = 32 if "group" in name else 96
    for c in range(w.shape[1]):
        for g in range(0, 96, group):
            tile = w[g : g + group, c].astype(np.float64)
            err = np.sum((w_hat[g : g + group, c] - tile) ** 2)
            assert err <= np.sum((absmax[g : g + group, c] - tile) ** 2) * (1 + 1e-6)
            ref = _np_clip_search(tile, fmt, symmetric, grid=50, min_ratio=0.3)
            np.testing.assert_allclose(err, ref.min(), rtol=1e-5)
    assert scale.dtype == jnp.float32 and (zp is None) == symmetric


def test_mse_clip_search_keeps_pow2_and_bf16_scale_dtypes():
    w = jnp.asarray(RNG.standard_t(3, size=(64, 64)), jnp.float32)
    scale, _ = R.mse_clip_search(w, qn.mxfp4(axis=0))
    assert scale.dtype == jnp.float8_e8m0fnu and scale.shape == (2, 64)
    s = np.asarray(scale, np.float64)
    np.testing.assert_array_equal(np.log2(s), np.round(np.log2(s)))
    scale, _ = R.mse_clip_search(w, qn.QuantSpec("int4", qn.per_axis(1), scale_dtype="bfloat16"))
    assert scale.dtype == jnp.bfloat16


def test_mse_range_equals_brute_force_over_bin_centres():
    x = _laplace_with_outliers(50_000, 2)
    h = R.histogram_update(R.histogram_init((), 1024), jnp.asarray(x), float(np.abs(x).max()))
    t = float(R.mse_range(h, qn.QuantSpec("int8"), grid=100, min_ratio=0.01))
    amax, counts = float(h.amax), np.asarray(h.counts, np.float64)
    centres = (np.arange(1024) + 0.5) / 1024 * amax
    ratios = (1.0 - np.arange(100) / 100).astype(np.float32)

    def error(t):
        return np.sum(counts * (_np_fake_quant(centres, -np.float32(t), np.float32(t), "int8", True) - centres) ** 2)

    np.testing.assert_allclose(error(t), min(error(amax * r) for r in ratios), rtol=1e-5)
    assert t < amax  # the two outliers are clipped


# ---- EMA ------------------------------------------------------------------------------------------------


def test_ema_range_matches_hand_computation():
    np.testing.assert_allclose(float(R.ema_range(jnp.float32(2.0), jnp.float32(4.0), 0.25)), 2.5, rtol=1e-7)
    r = jnp.float32(1.0)
    for new in (3.0, 5.0):
        r = R.ema_range(r, jnp.float32(new), 0.1)
    np.testing.assert_allclose(float(r), 0.9 * (0.9 * 1.0 + 0.1 * 3.0) + 0.1 * 5.0, rtol=1e-6)

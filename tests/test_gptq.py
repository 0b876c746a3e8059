"""GPTQ (`qjax.experiments.gptq`) against an independent float64 numpy reference, and its behaviour."""

import numpy as np
import pytest

import qjax.numerics as qn
from qjax.experiments.gptq import gptq_quantize

N_IN, N_OUT = 64, 32


def _calibration(n_in: int = N_IN, n: int = 512, seed: int = 0) -> np.ndarray:
    """Correlated inputs X = Z·D·M: latent factors of decaying strength D mixed by a random M, so H is far from diagonal."""
    rng = np.random.default_rng(seed)
    mix = np.exp(-np.arange(n_in) / 16)[:, None] * rng.standard_normal((n_in, n_in)) * 3 / np.sqrt(n_in)
    return rng.standard_normal((n, n_in)) @ mix


def _problem(seed: int = 0, n_in: int = N_IN, n_out: int = N_OUT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = _calibration(n_in, seed=seed)
    h = 2.0 / len(x) * x.T @ x
    k = (np.random.default_rng(seed + 1).standard_normal((n_in, n_out)) * 0.1).astype(np.float32)
    return x, h, k


# ---- the reference: unblocked GPTQ in float64, HF layout W = kernelᵀ (out, in), columns = input features ----


def _params(x: np.ndarray, fmt: qn.Format, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-row scale / zero point of x (rows, cols), float32 arithmetic as the library's scales."""
    x = x.astype(np.float32)
    if symmetric:
        amax = np.abs(x).max(axis=1)
        return np.where(amax > 0, amax / np.float32(fmt.max_value), np.float32(1)).astype(np.float32), np.zeros(len(x), np.float32)
    lo, hi = np.minimum(x.min(axis=1), 0), np.maximum(x.max(axis=1), 0)
    s = np.where(hi > lo, (hi - lo) / np.float32(fmt.qmax - fmt.qmin), np.float32(1)).astype(np.float32)
    return s, np.clip(np.round(np.float32(fmt.qmin) - lo / s), fmt.qmin, fmt.qmax).astype(np.float32)


def _round(v: np.ndarray, fmt: qn.Format) -> np.ndarray:
    v = v.astype(np.float32)
    if fmt.kind == "int":
        return np.clip(np.round(v), fmt.qmin, fmt.qmax)
    grid = np.asarray(fmt.grid, np.float32)
    return grid[np.searchsorted((grid[1:] + grid[:-1]) / 2, v, side="left")]


def reference_gptq(kernel, h, fmt, group=None, symmetric=True, act_order=False, static_groups=False, damp=0.01):
    """Column-by-column GPTQ (no lazy blocks); returns the quantized kernel (in, out) and the damped H."""
    fmt = qn.get_format(fmt)
    w, h = np.array(kernel, np.float64).T.copy(), np.array(h, np.float64)
    n = w.shape[1]
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    g = group or n
    params = {}
    if static_groups or group is None:
        params = {c // g: _params(w[:, c : c + g], fmt, symmetric) for c in range(0, n, g)}
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    w, hp = w[:, order], h[order][:, order]
    hd = hp + damp * np.mean(np.diag(hp)) * np.eye(n)
    u = np.linalg.cholesky(np.linalg.inv(hd)).T
    q = np.zeros_like(w)
    for i in range(n):
        if order[i] // g not in params:  # first feature of a dynamic group (no act_order: order[i] == i)
            params[order[i] // g] = _params(w[:, i : i + g], fmt, symmetric)  # fully updated weights
        s, z = params[order[i] // g]
        codes = _round(w[:, i] / s + z, fmt)
        q[:, i] = (codes - z) * s
        w[:, i:] -= np.outer((w[:, i] - q[:, i]) / u[i, i], u[i, i:])
    inv = np.argsort(order)
    return q[:, inv].T, hd[inv][:, inv]


CASES = {
    "channel_int4": (qn.QuantSpec("int4", qn.per_axis(1)), dict(fmt="int4")),
    "group16_int4": (qn.QuantSpec("int4", qn.per_group(0, 16)), dict(fmt="int4", group=16)),
    "group16_uint3_asym": (qn.QuantSpec("uint3", qn.per_group(0, 16), symmetric=False), dict(fmt="uint3", group=16, symmetric=False)),
    "channel_int3_asym": (qn.QuantSpec("int3", qn.per_axis(1), symmetric=False), dict(fmt="int3", symmetric=False)),
    "group16_nf4": (qn.QuantSpec("nf4", qn.per_group(0, 16)), dict(fmt="nf4", group=16)),
    "group8_fp4": (qn.QuantSpec("fp4", qn.per_group(0, 8)), dict(fmt="fp4_e2m1", group=8)),
}


@pytest.mark.parametrize("block", [16, 24])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case, block):
    """Equal to the unblocked reference for lazy blocks of 16 and of 24 (groups of 16 straddle blocks of 24)."""
    spec, kw = CASES[case]
    _, h, k = _problem()
    qa, info = gptq_quantize(k, h, spec, block_size=block)
    expected, _ = reference_gptq(k, h, **kw)
    np.testing.assert_allclose(np.asarray(qa.dequantize()), expected, rtol=0, atol=1e-5)
    assert info.retries == 0 and info.damp == 0.01 and info.perm is None and info.dead == 0


@pytest.mark.parametrize("case", ["channel_int4", "group16_int4", "group16_uint3_asym"])
def test_act_order_matches_reference(case):
    spec, kw = CASES[case]
    _, h, k = _problem(seed=3)
    static = "group" in case
    qa, info = gptq_quantize(k, h, spec, block_size=16, act_order=True, static_groups=static)
    expected, _ = reference_gptq(k, h, act_order=True, static_groups=static, **kw)
    np.testing.assert_allclose(np.asarray(qa.dequantize()), expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(info.perm, np.argsort(-np.diag(h), kind="stable"))
    assert np.all(np.diff(np.diag(h)[info.perm]) <= 0)


def test_static_groups_without_act_order_matches_reference():
    spec, kw = CASES["group16_int4"]
    _, h, k = _problem(seed=4)
    qa, _ = gptq_quantize(k, h, spec, block_size=16, static_groups=True)
    expected, _ = reference_gptq(k, h, static_groups=True, **kw)
    np.testing.assert_allclose(np.asarray(qa.dequantize()), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["channel_int4", "group16_uint3_asym"])
def test_packed_qarray_and_error(case):
    """The QArray is quantize(result, spec, scale, zero point) and info.error = ½ tr(Δᵀ H_damped Δ)."""
    spec, kw = CASES[case]
    _, h, k = _problem(seed=5)
    qa, info = gptq_quantize(k, h, spec, block_size=16)
    w_hat = np.asarray(qa.dequantize())
    again = qn.quantize(w_hat, spec, scale=qa.scale, zero_point=qa.zero_point)
    np.testing.assert_array_equal(np.asarray(again.values), np.asarray(qa.values))
    assert qa.scale.shape == ((N_IN // kw["group"], N_OUT) if "group" in kw else (1, N_OUT))
    assert qa.shape == k.shape and qa.format == spec.format
    _, hd = reference_gptq(k, h, **kw)
    delta = w_hat.astype(np.float64) - k
    np.testing.assert_allclose(info.error, 0.5 * np.sum(delta * (hd @ delta)), rtol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("granularity", ["channel", "group16"])
def test_output_error_below_rtn(bits, granularity, symmetric):
    """‖X Ŵ − X W‖ on the calibration inputs is clearly below round-to-nearest's."""
    x, h, k = _problem(seed=6)
    g = qn.per_axis(1) if granularity == "channel" else qn.per_group(0, 16)
    spec = qn.QuantSpec(f"int{bits}", g, symmetric=symmetric)
    qa, _ = gptq_quantize(k, h, spec, block_size=16)
    err_gptq = np.linalg.norm(x @ (np.asarray(qa.dequantize()) - k))
    err_rtn = np.linalg.norm(x @ (np.asarray(qn.quantize(k, spec).dequantize()) - k))
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_act_order_processes_largest_diag_first_and_keeps_groups_contiguous():
    """The feature with the largest H_ii is quantized first (= RTN with the static scales); scales equal RTN's."""
    x, h, k = _problem(seed=7)
    top = 37
    h[top, top] *= 10  # make input 37 the most important by far
    spec = qn.QuantSpec("int4", qn.per_group(0, 16))
    qa, info = gptq_quantize(k, h, spec, block_size=16, act_order=True, static_groups=True)
    rtn = qn.quantize(k, spec)
    assert info.perm[0] == top
    np.testing.assert_array_equal(np.asarray(qa.scale), np.asarray(rtn.scale))  # one scale per contiguous group of 16
    w_hat, w_rtn = np.asarray(qa.dequantize()), np.asarray(rtn.dequantize())
    np.testing.assert_array_equal(w_hat[top], w_rtn[top])
    assert not np.array_equal(w_hat[0], w_rtn[0])  # later features absorbed earlier errors
    plain, _ = gptq_quantize(k, h, spec, block_size=16, static_groups=True)
    assert not np.array_equal(np.asarray(plain.dequantize())[top], w_rtn[top])


def test_act_order_group_errors():
    _, h, k = _problem()
    with pytest.raises(ValueError, match="static_groups=True"):
        gptq_quantize(k, h, qn.QuantSpec("int4", qn.per_group(0, 16)), act_order=True)
    with pytest.raises(ValueError, match="group size 128 .* input dimension 64"):
        gptq_quantize(k, h, qn.QuantSpec("int4", qn.per_group(0, 128)), act_order=True, static_groups=True)


def test_dead_inputs():
    """Inputs with H_ii == 0 get zero weights and H_ii = 1; the rest equals the reference."""
    x, _, k = _problem(seed=8)
    dead = [3, 20, 41]
    x[:, dead] = 0
    h = 2.0 / len(x) * x.T @ x
    spec, kw = CASES["group16_int4"]
    qa, info = gptq_quantize(k, h, spec, block_size=16)
    w_hat = np.asarray(qa.dequantize())
    assert info.dead == 3 and np.all(w_hat[dead] == 0) and np.all(np.isfinite(w_hat))
    np.testing.assert_allclose(w_hat, reference_gptq(k, h, **kw)[0], rtol=0, atol=1e-5)


def _indefinite(min_eig_ratio: float, seed: int = 9) -> np.ndarray:
    """A symmetric H with eigenvalues 1..2 and one equal to min_eig_ratio × mean(diag H) (negative)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((N_IN, N_IN)))
    lam = rng.uniform(1.0, 2.0, N_IN)
    lam[0] = min_eig_ratio * lam[1:].sum() / (N_IN - min_eig_ratio)  # so lam[0] = ratio × mean(lam)
    return q @ np.diag(lam) @ q.T


def test_damping_retries_reported():
    """An eigenvalue at −5% of mean diag H: damping 0.01 fails, 0.1 succeeds."""
    _, _, k = _problem()
    h = _indefinite(-0.05)
    np.testing.assert_allclose(np.linalg.eigvalsh(h)[0], -0.05 * np.mean(np.diag(h)), rtol=1e-6)
    qa, info = gptq_quantize(k, h, qn.QuantSpec("int4", qn.per_axis(1)), block_size=16)
    assert info.retries == 1 and info.damp == pytest.approx(0.1)
    assert info.damp_value == pytest.approx(0.1 * np.mean(np.diag(h)))
    assert np.all(np.isfinite(np.asarray(qa.dequantize())))


def test_non_pd_raises_with_path():
    _, _, k = _problem()
    h = _indefinite(-50.0)  # beyond 0.01 × 10³ = 10 × mean diag
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.down_proj.*3 retries.*last damping 10 "):
        gptq_quantize(k, h, qn.QuantSpec("int4", qn.per_axis(1)), path="model.layers.3.mlp.down_proj")
    with pytest.raises(ValueError, match="layer0.*not positive definite"):
        gptq_quantize(k, -np.eye(N_IN), qn.QuantSpec("int4", qn.per_axis(1)), path="layer0", max_damp_retries=1)

"""LLM.int8() outlier decomposition (`dot_general(..., outlier_threshold=t)`) against a float64 numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax.numerics as qn
import qjax.ops as qo
from tests import np_reference as ref

DN = (((2,), (0,)), ((), ()))  # (b, t, k) x (k, n)
A8 = qn.QuantSpec("int8", qn.per_token())
W8 = qn.QuantSpec("int8", qn.per_axis(1))
SYSTEMATIC = [5, 22, 41, 60]  # outliers in about half the tokens
OUTLIER_COLS = SYSTEMATIC + [50]  # 50: in one token of the second sequence only


def _planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Activations (2, 16, 64) ~ N(0, 1) with a few columns of magnitude 20-60; weight (64, 48)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 16, 64))
    for j in SYSTEMATIC:
        hit = rng.random((2, 16)) < 0.5
        hit[0, 0] = True
        x[..., j] = np.where(hit, rng.choice([-1, 1], (2, 16)) * rng.uniform(20, 60, (2, 16)), x[..., j])
    x[1, 9, 50] = -30.0
    w = rng.standard_normal((64, 48)) / 8
    return x.astype(np.float32), w.astype(np.float32)


def _reference(x: np.ndarray, w: np.ndarray, threshold: float = 6.0) -> np.ndarray:
    """Float outlier columns × exact weight rows + per-token int8 (rest of x) × per-channel int8 (rest of w)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    mask = np.abs(x).max(axis=(0, 1)) >= threshold
    xq = ref.int_symmetric(np.where(mask, 0, x), 8, axis_keep=(0, 1))
    wq = ref.int_symmetric(np.where(mask[:, None], 0, w), 8, axis_keep=(1,))
    return xq @ wq + x[..., mask] @ w[mask]


def _close(y, expected: np.ndarray, rel: float = 3e-6) -> None:
    scale = np.abs(expected).max()
    assert np.abs(np.asarray(y, np.float64) - expected).max() <= rel * scale * np.sqrt(expected.size)


def test_outlier_mask_is_the_numpy_set_of_columns_reaching_the_threshold():
    x, _ = _planted()
    x[1, 3, 9] = 6.0  # one token exactly at the threshold: an outlier (≥)
    x[0, 7, 30] = -5.99  # just below: not
    mask = np.asarray(qo.outlier_features(jnp.asarray(x), 6.0))
    expected = np.abs(x.astype(np.float64)).max(axis=(0, 1)) >= 6.0
    np.testing.assert_array_equal(mask, expected)
    assert sorted(np.flatnonzero(mask)) == sorted(OUTLIER_COLS + [9])
    # features on another axis: (k, b, t)
    np.testing.assert_array_equal(np.asarray(qo.outlier_features(jnp.asarray(x.transpose(2, 0, 1)), 6.0, axes=(0,))), expected)


@pytest.mark.parametrize("mode", ["fake", "int"])
def test_decomposed_int8_matmul_equals_float64_reference(mode):
    x, w = _planted()
    y = qo.dot_general(jnp.asarray(x), jnp.asarray(w), DN, lhs_spec=A8, rhs_spec=W8, mode=mode, outlier_threshold=6.0)
    assert y.shape == (2, 16, 48) and y.dtype == jnp.float32
    _close(y, _reference(x, w))
    via_einsum = qo.einsum("btk,kn->btn", jnp.asarray(x), jnp.asarray(w), lhs_spec=A8, rhs_spec=W8, mode=mode, outlier_threshold=6.0)
    np.testing.assert_allclose(np.asarray(via_einsum), np.asarray(y), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode", ["fake", "int"])
def test_decomposition_error_is_far_below_plain_w8a8(mode):
    x, w = _planted()
    exact = x.astype(np.float64) @ w.astype(np.float64)
    kw = dict(lhs_spec=A8, rhs_spec=W8, mode=mode)
    plain = qo.dot_general(jnp.asarray(x), jnp.asarray(w), DN, **kw)
    mixed = qo.dot_general(jnp.asarray(x), jnp.asarray(w), DN, outlier_threshold=6.0, **kw)
    err_plain = np.abs(np.asarray(plain, np.float64) - exact).mean()
    err_mixed = np.abs(np.asarray(mixed, np.float64) - exact).mean()
    assert err_mixed < err_plain / 8, (err_mixed, err_plain)


@pytest.mark.parametrize("mode", ["fake", "int"])
def test_infinite_threshold_is_exactly_the_plain_quantized_matmul(mode):
    x, w = _planted()
    kw = dict(lhs_spec=A8, rhs_spec=W8, mode=mode)
    plain = qo.dot_general(jnp.asarray(x), jnp.asarray(w), DN, **kw)
    none = qo.dot_general(jnp.asarray(x), jnp.asarray(w), DN, outlier_threshold=float("inf"), **kw)
    np.testing.assert_array_equal(np.asarray(none), np.asarray(plain))


@pytest.mark.parametrize("mode", ["fake", "int"])
def test_packed_weight_uses_its_dequantized_rows(mode):
    x, w = _planted()
    wq = qn.quantize(jnp.asarray(w), W8)
    y = qo.dot_general(jnp.asarray(x), wq, DN, lhs_spec=A8, mode=mode, outlier_threshold=6.0)
    x64, w_hat = x.astype(np.float64), np.asarray(wq.dequantize(), np.float64)
    mask = np.abs(x64).max(axis=(0, 1)) >= 6.0
    expected = ref.int_symmetric(np.where(mask, 0, x64), 8, axis_keep=(0, 1)) @ w_hat + x64[..., mask] @ w_hat[mask]
    _close(y, expected)


def test_other_contracting_layouts_match_the_standard_one():
    x, w = _planted()
    x2, w2 = x.reshape(32, 64), w
    y = qo.dot_general(jnp.asarray(x2), jnp.asarray(w2), (((1,), (0,)), ((), ())), lhs_spec=qn.QuantSpec("int8", qn.per_axis(0)),
                       rhs_spec=W8, mode="int", outlier_threshold=6.0)  # fmt: skip
    yt = qo.dot_general(jnp.asarray(x2.T), jnp.asarray(w2.T), (((0,), (1,)), ((), ())), lhs_spec=qn.QuantSpec("int8", qn.per_axis(1)),
                        rhs_spec=qn.QuantSpec("int8", qn.per_axis(0)), mode="int", outlier_threshold=6.0)  # fmt: skip
    _close(yt, np.asarray(y, np.float64))
    _close(y, _reference(x, w).reshape(32, 48))


def test_works_under_jit_and_grad_with_straight_through_gradients():
    x, w = _planted()
    g = np.random.default_rng(1).standard_normal((2, 16, 48))

    def loss(x, w):
        y = qo.dot_general(x, w, DN, lhs_spec=A8, rhs_spec=W8, mode="fake", outlier_threshold=6.0)
        return jnp.sum(y * g)

    eager = qo.dot_general(jnp.asarray(x), jnp.asarray(w), DN, lhs_spec=A8, rhs_spec=W8, mode="int", outlier_threshold=6.0)
    jitted = jax.jit(lambda x, w: qo.dot_general(x, w, DN, lhs_spec=A8, rhs_spec=W8, mode="int", outlier_threshold=6.0))
    _close(jitted(jnp.asarray(x), jnp.asarray(w)), np.asarray(eager, np.float64))

    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(w))
    # STE: quantizers pass gradients through; the outlier part is a plain float product.
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    mask = np.abs(x64).max(axis=(0, 1)) >= 6.0
    xq = ref.int_symmetric(np.where(mask, 0, x64), 8, axis_keep=(0, 1))
    wq = ref.int_symmetric(np.where(mask[:, None], 0, w64), 8, axis_keep=(1,))
    gx_ref = np.where(mask, g @ w64.T, g @ wq.T)
    gw_ref = np.where(mask[:, None], np.einsum("btk,btn->kn", np.where(mask, x64, 0), g), np.einsum("btk,btn->kn", xq, g))
    _close(gx, gx_ref)
    _close(gw, gw_ref)


def test_a_packed_activation_is_refused():
    x, w = _planted()
    with pytest.raises(ValueError, match="outlier_threshold"):
        qo.dot_general(qn.quantize(jnp.asarray(x), A8), jnp.asarray(w), DN, mode="int", outlier_threshold=6.0)

"""BitStack decomposition against numpy float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from qjax.numerics import bitstack as bs

M, N, K = 24, 20, 3


@pytest.fixture(scope="module")
def w():
    return np.random.default_rng(0).standard_normal((M, N)).astype(np.float32)


@pytest.fixture(scope="module")
def bw(w):
    return bs.decompose(w, 6, K)


def np_block(r: np.ndarray, k: int):
    """Float64 reference of one iteration: sign (0 → +1) and the rank-k SVD of |r|."""
    s = np.where(r >= 0, 1.0, -1.0)
    u, sig, vt = np.linalg.svd(np.abs(r), full_matrices=False)
    return s, (u[:, :k] * sig[:k]) @ vt[:k]


def np_unpack(p: np.ndarray, n: int) -> np.ndarray:
    """Independent reading of the layout: column j is bit j % 8 of byte j // 8."""
    bits = np.unpackbits(p, axis=-1, bitorder="little")[..., :n]
    return np.where(bits > 0, 1.0, -1.0)


def test_first_block_matches_float64_reference(w, bw):
    s, ab = np_block(w.astype(np.float64), K)
    np.testing.assert_array_equal(np_unpack(np.asarray(bw.signs[0]), N), s)
    got = np.asarray(bw.a[0], np.float64) @ np.asarray(bw.b[0], np.float64)
    assert np.linalg.norm(got - ab) / np.linalg.norm(ab) < 1e-3
    np.testing.assert_allclose(np.asarray(bw.with_active(1).dequantize()), s * got, rtol=1e-5, atol=1e-6)


def test_zero_has_positive_sign():
    z = np.ones((8, 8), np.float32)
    z[2, 3] = 0.0
    assert np_unpack(np.asarray(bs.decompose(z, 1, 1).signs[0]), 8)[2, 3] == 1.0


def test_error_falls_monotonically_with_blocks(w, bw):
    errs = [np.linalg.norm(w - np.asarray(bw.with_active(b).dequantize(), np.float64)) for b in range(7)]
    assert errs[0] == pytest.approx(np.linalg.norm(w))
    assert all(e1 < e0 for e0, e1 in zip(errs, errs[1:])), errs


def test_sign_planes_round_trip_bit_exactly():
    s = np.where(np.random.default_rng(1).standard_normal((5, 13)) >= 0, 1.0, -1.0)
    p = bs.pack_signs(jnp.asarray(s))
    assert p.shape == (5, 2) and p.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(bs.unpack_signs(p, 13)), s)
    np.testing.assert_array_equal(np_unpack(np.asarray(p), 13), s)
    assert not np.any(np.asarray(p)[:, 1] >> 5)  # padding bits are zero


def test_nbytes_formula_and_growth(bw):
    per_block = M * (-(-N // 8)) + 2 * K * (M + N)
    assert bw.block_nbytes == per_block
    assert bw.nbytes_total == 6 * per_block
    arrays = (bw.signs, bw.a, bw.b)
    assert bw.nbytes_total == sum(x.size * x.dtype.itemsize for x in arrays)
    sizes = [bw.with_active(b).nbytes for b in range(7)]
    assert sizes == [b * per_block for b in range(7)]


@pytest.mark.parametrize("active", [0, 1, 3, 6])
def test_matmul_equals_dense(bw, active):
    x = np.random.default_rng(2).standard_normal((2, 5, M)).astype(np.float32)
    v = bw.with_active(active)
    dense = np.asarray(x, np.float64) @ np.asarray(v.dequantize(), np.float64)
    got = np.asarray(v.matmul(jnp.asarray(x)), np.float64)
    assert got.shape == (2, 5, N)
    assert np.linalg.norm(got - dense) <= 1e-4 * max(np.linalg.norm(dense), 1e-30)
    jitted = jax.jit(lambda w_, n_, x_: w_.with_active(n_).matmul(x_))(bw, jnp.int32(active), x)
    jit_dense = jax.jit(lambda w_, n_: w_.with_active(n_).dequantize())(bw, jnp.int32(active))
    np.testing.assert_allclose(np.asarray(jitted), got, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jit_dense), np.asarray(v.dequantize()), rtol=1e-6, atol=1e-7)


def test_dequantize_matches_float64_sum_of_blocks(bw):
    s = np_unpack(np.asarray(bw.signs), N)
    ab = np.asarray(bw.a, np.float64) @ np.asarray(bw.b, np.float64)
    np.testing.assert_allclose(np.asarray(bw.with_active(4).dequantize()), (s * ab)[:4].sum(0), rtol=1e-5, atol=1e-5)


def test_with_active_changes_result_without_redecomposing(bw):
    v = bw.with_active(2)
    for name in ("signs", "a", "b"):
        assert getattr(v, name) is getattr(bw, name)
    assert not np.allclose(np.asarray(v.dequantize()), np.asarray(bw.dequantize()))
    with pytest.raises(ValueError, match=r"\[0, 6\].*7"):
        bw.with_active(7)


def test_deterministic(w, bw):
    again = bs.decompose(w, 6, K)
    for x, y in zip(jax.tree.leaves(bw), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_later_blocks_follow_the_float64_residual(w):
    """Residuals use the fp32 factors: with fp16-rounded ones block 4 drifts ~7e-3 from this reference."""
    r = w.astype(np.float64)
    got = bs.decompose(w, 4, K)
    for i in range(4):
        s, ab = np_block(r, K)
        np.testing.assert_array_equal(np_unpack(np.asarray(got.signs[i]), N), s)
        got_ab = np.asarray(got.a[i], np.float64) @ np.asarray(got.b[i], np.float64)
        assert np.linalg.norm(got_ab - ab) / np.linalg.norm(ab) < 1e-3, i
        r = r - s * ab


def test_bad_inputs_raise_with_numbers(w):
    with pytest.raises(ValueError, match=r"21.*20|20.*21"):
        bs.decompose(w, 2, 21)
    with pytest.raises(ValueError, match="rank"):
        bs.decompose(w, 2, 0)
    with pytest.raises(ValueError, match="n_blocks.*0"):
        bs.decompose(w, 0, 2)
    bad = w.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        bs.decompose(bad, 1, 2)


def test_pytree_and_orbax_round_trip(bw, tmp_path):
    same = jax.tree.map(lambda a: a, bw)
    assert isinstance(same, bs.BitStackWeight) and same.shape == bw.shape and same.rank == K
    v = bw.with_active(4)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", {"w": v})
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, {"w": v}))["w"]
    assert isinstance(restored, bs.BitStackWeight) and int(restored.active) == 4
    for x, y in zip(jax.tree.leaves(v), jax.tree.leaves(restored)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

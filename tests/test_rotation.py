"""Hadamard / random orthogonal rotations against independent numpy float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.numerics import rotation as rot
from qjax.numerics.linear_maps import fold_into_kernel


def _sylvester(n: int) -> np.ndarray:
    """Sylvester Hadamard matrix built by block recursion [[H, H], [H, −H]] in float64."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _reference_matrix(m: rot.RandomHadamard) -> np.ndarray:
    """diag(signs) (mix ⊗ H_p/√p) in float64 from the map's fields, H_p by the recursion above."""
    signs, mix = np.asarray(m.signs, np.float64), np.asarray(m.mix, np.float64)
    p = signs.shape[0] // mix.shape[0]
    return signs[:, None] * np.kron(mix, _sylvester(p) / np.sqrt(p))


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_fwht_matches_sylvester(n):
    x = np.random.default_rng(n).normal(size=(3, 5, n)).astype(np.float32)
    got = np.asarray(rot.fwht(jnp.asarray(x)), np.float64)
    np.testing.assert_allclose(got, x.astype(np.float64) @ _sylvester(n) / np.sqrt(n), atol=1e-5)


def test_fwht_keeps_dtype_and_is_involution():
    x = jax.random.normal(jax.random.key(0), (4, 128), jnp.bfloat16)
    assert rot.fwht(x).dtype == jnp.bfloat16
    y = jax.random.normal(jax.random.key(1), (4, 128))
    np.testing.assert_allclose(rot.fwht(rot.fwht(y)), y, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 28, 36, 44, 60, 96, 576, 1536])
def test_hadamard_matrix_is_hadamard(n):
    assert rot.hadamard_order_known(n)
    h = rot.hadamard_matrix(n)
    assert h.shape == (n, n) and np.all(np.abs(h) == 1)
    h = h.astype(np.float64)  # exact below 2^53, BLAS-fast
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


@pytest.mark.parametrize(("n", "known"), [
    (12, True), (20, True), (24, True), (32, True),  # Paley I: q = 11, 19, 23, 31 (≡ 3 mod 4)
    (36, True), (28, True), (60, True),  # Paley II: 2(q+1), q = 17, 13 (≡ 1 mod 4); 60: Paley I, q = 59
    (52, False), (16, False),  # 51 = 3·17, 25 not prime; 15 not prime, 7 ≡ 3 (mod 4)
])  # fmt: skip
def test_paley_constructions_directly(n, known):
    h = rot._base_hadamard(n)
    assert (h is not None) == known
    if known:
        assert h.shape == (n, n)
        h = h.astype(np.float64)
        np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


def test_power_of_two_is_sylvester():
    np.testing.assert_array_equal(rot.hadamard_matrix(64), _sylvester(64))


@pytest.mark.parametrize("n", [3, 6, 9, 10, 18, 22, 92, 184, 0, -4])
def test_unknown_orders_raise(n):
    assert not rot.hadamard_order_known(n)
    with pytest.raises(ValueError, match=str(n)):
        rot.hadamard_matrix(n)


def test_random_orthogonal_is_orthogonal_and_haar_signed():
    q = np.asarray(rot.random_orthogonal(jax.random.key(0), 48), np.float64)
    np.testing.assert_allclose(q @ q.T, np.eye(48), atol=1e-5)
    # Without the sign fix LAPACK's QR makes Q[0, 0] < 0 almost always; Haar has mean 0 (std 0.5 for n = 4).
    qs = jax.vmap(lambda k: rot.random_orthogonal(k, 4))(jax.random.split(jax.random.key(1), 400))
    assert abs(float(jnp.mean(qs[:, 0, 0]))) < 0.1
    assert abs(float(jnp.mean(qs[:, 2, 3]))) < 0.1


@pytest.mark.parametrize(("n", "mix", "m"), [
    (64, "auto", 1), (576, "auto", 36), (1536, "auto", 12), (96, "auto", 12),
    (576, "random", 9), (1536, "random", 3), (96, "hadamard", 12), (18, "auto", 9),
])  # fmt: skip
def test_random_hadamard_orthogonal_and_matches_matrix(n, mix, m):
    t = rot.random_hadamard(jax.random.key(n), n, mix=mix)
    assert t.size == n and t.mix.shape == (m, m) and t.signs.dtype == jnp.float32
    assert set(np.unique(np.asarray(t.signs))) == {-1.0, 1.0}
    ref = _reference_matrix(t)
    np.testing.assert_allclose(ref @ ref.T, np.eye(n), atol=1e-5)
    np.testing.assert_allclose(np.asarray(t.matrix(), np.float64), ref, atol=1e-6)
    mat = np.asarray(t.matrix(), np.float64)
    np.testing.assert_allclose(mat @ mat.T, np.eye(n), atol=1e-5)
    x = np.random.default_rng(0).normal(size=(2, 7, n)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(t.apply(jnp.asarray(x)), np.float64), x.astype(np.float64) @ ref, atol=1e-4)
    np.testing.assert_array_equal(t.dual(jnp.asarray(x)), t.apply(jnp.asarray(x)))


@pytest.mark.parametrize("n", [576, 1536])
def test_fold_into_kernel_preserves_matmul(n):
    t = rot.random_hadamard(jax.random.key(3), n)
    kx, kw = jax.random.split(jax.random.key(4))
    x, w = jax.random.normal(kx, (16, n)), jax.random.normal(kw, (n, 40))
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    got = np.asarray(t.apply(x) @ fold_into_kernel(t, w), np.float64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4


@pytest.mark.parametrize("mix", ["auto", "random"])
def test_rotation_spreads_planted_outlier(mix):
    x = np.random.default_rng(0).normal(size=(256, 576)).astype(np.float32)
    x[:, 7] *= 100.0
    ratio = lambda a: float(np.max(np.abs(a)) / np.mean(np.abs(a)))  # noqa: E731
    y = np.asarray(rot.random_hadamard(jax.random.key(5), 576, mix=mix).apply(jnp.asarray(x)))
    assert ratio(x) / ratio(y) > 20, (ratio(x), ratio(y))


def test_jit_vmap_and_pytree():
    t = rot.random_hadamard(jax.random.key(6), 96)
    x = jax.random.normal(jax.random.key(7), (5, 3, 96))
    eager = t.apply(x)
    np.testing.assert_allclose(jax.jit(lambda m, v: m.apply(v))(t, x), eager, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(t.apply)(x), eager, atol=1e-5)
    np.testing.assert_allclose(jax.jit(jax.vmap(rot.fwht))(x[..., :64]), rot.fwht(x[..., :64]), atol=1e-5)
    leaves, treedef = jax.tree.flatten(t)
    assert len(leaves) == 2 and isinstance(jax.tree.unflatten(treedef, leaves), rot.RandomHadamard)
    ts = jax.vmap(lambda k: rot.random_hadamard(k, 96))(jax.random.split(jax.random.key(8), 3))
    assert ts.signs.shape == (3, 96) and ts.mix.shape == (3, 12, 12)


def test_hadamard_rotation_deterministic():
    a, b = rot.hadamard_rotation(1536), rot.hadamard_rotation(1536)
    np.testing.assert_array_equal(a.signs, np.ones(1536, np.float32))
    np.testing.assert_array_equal(a.mix, b.mix)
    ref = np.kron(rot.hadamard_matrix(12), _sylvester(128)) / np.sqrt(1536)
    np.testing.assert_allclose(np.asarray(a.matrix(), np.float64), ref, atol=1e-6)
    keyed = rot.hadamard_rotation(1536, jax.random.key(9))
    assert set(np.unique(np.asarray(keyed.signs))) == {-1.0, 1.0}
    c = rot.hadamard_rotation(18)  # no known order: fixed-key random mix, still deterministic
    np.testing.assert_array_equal(c.mix, rot.hadamard_rotation(18).mix)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="12"):
        rot.fwht(jnp.ones((2, 12)))
    with pytest.raises(ValueError, match="18"):
        rot.random_hadamard(jax.random.key(0), 18, mix="hadamard")
    with pytest.raises(ValueError, match="mix"):
        rot.random_hadamard(jax.random.key(0), 64, mix="dense")
    with pytest.raises(ValueError, match="0"):
        rot.random_hadamard(jax.random.key(0), 0)
    with pytest.raises(ValueError, match="96"):
        rot.random_hadamard(jax.random.key(0), 96).apply(jnp.ones((2, 64)))

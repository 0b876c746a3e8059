"""DuQuant's pure math: base rotation, greedy rotations, zigzag, smoothing, and the composed linear map."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.experiments import duquant_math as dm
from qjax.numerics.linear_maps import ChannelScale, Compose, Permutation, Rotation, fold_into_kernel

OUTLIER_CHANNELS = np.array([5, 40, 77, 100])  # "normal" outliers, all in the first 128-block
MASSIVE = (7, 13)  # one massive activation (token, channel)


@functools.cache
def planted() -> tuple[np.ndarray, np.ndarray]:
    """256 tokens × 256 channels Gaussian, 4 channels ×20, one entry = 500; Gaussian kernel (256, 256)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 256))
    x[:, OUTLIER_CHANNELS] *= 20
    x[MASSIVE] = 500.0
    return x, rng.standard_normal((256, 256))


def stats(x, w):
    return np.abs(x).max(0), np.abs(w).max(1)


def q4(a: np.ndarray, axis: int) -> np.ndarray:
    """Symmetric abs-max int4 fake quant in float64, one scale per slice along `axis`'s complement."""
    s = np.abs(a).max(axis=axis, keepdims=True) / 7
    s = np.where(s == 0, 1, s)
    return np.clip(np.round(a / s), -8, 7) * s


def transformed(m, x, w):
    if m is None:
        return x, w
    xt = np.asarray(m.apply(jnp.asarray(x, jnp.float32)), np.float64)
    return xt, np.asarray(fold_into_kernel(m, jnp.asarray(w, jnp.float32)), np.float64)


def metrics(m, x, w) -> tuple[float, float]:
    """(max/median of |XT|, W4A4 relative error: per-token activations, per-output-channel weights)."""
    xt, wt = transformed(m, x, w)
    ref = x @ w
    err = np.linalg.norm(q4(xt, 1) @ q4(wt, 0) - ref) / np.linalg.norm(ref)
    return float(np.abs(xt).max() / np.median(np.abs(xt))), float(err)


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


@functools.cache
def duq(shared: bool, **kw):
    x, w = planted()
    return dm.duquant_map(*stats(x, w), block=kw.pop("block", 128), alpha=0.5, key=0, shared=shared, **kw)


@pytest.mark.parametrize("b", [2, 8, 128])
def test_base_rotation_orthogonal_with_uniform_first_row(b):
    r = dm.base_rotation(b)
    np.testing.assert_allclose(r @ r.T, np.eye(b), atol=1e-12)
    np.testing.assert_allclose(r[0], np.full(b, 1 / np.sqrt(b)), atol=1e-12)
    spike = np.zeros(b)
    spike[0] = 10.0
    np.testing.assert_allclose(spike @ r, np.full(b, 10 / np.sqrt(b)), atol=1e-12)  # x ↦ x R spreads channel 0


@pytest.mark.parametrize("shared", [True, False])
def test_greedy_pivots_on_the_outlier_channel(shared):
    stat = np.abs(np.random.default_rng(1).standard_normal(128)) * 0.01
    stat[64 + 37] = 100.0  # block 1, channel 37: the row index of the (2, 64) argmax would be 1, not 37
    blocks = dm.greedy_rotation(stat, 64, steps=1, key=3, shared=shared)
    out = np.einsum("nb,nbc->nc", stat.reshape(2, 64), blocks).ravel()
    # channel 37 was exchanged to position 0 and took the uniform row of the base rotation: R[37, 37] = 1/√b
    np.testing.assert_allclose(blocks[1][37, 37], 1 / 8, atol=1e-12)
    assert np.abs(out).max() < 50.0


@pytest.mark.parametrize("shared", [True, False])
def test_greedy_rotation_is_orthogonal_deterministic_and_lowers_peak(shared):
    x, w = planted()
    stat = stats(x, w)[0]
    blocks = dm.greedy_rotation(stat, 128, key=0, shared=shared)
    assert blocks.shape == (2, 128, 128)
    np.testing.assert_allclose(blocks @ np.swapaxes(blocks, 1, 2), np.broadcast_to(np.eye(128), blocks.shape), atol=1e-10)
    def peak(bl):
        return np.abs(np.einsum("nb,nbc->nc", stat.reshape(2, 128), bl)).max()

    one_step = dm.greedy_rotation(stat, 128, steps=1, key=0, shared=shared)  # same Q′ draw
    assert peak(blocks) <= peak(one_step) < np.abs(stat).max()  # the best prefix is kept
    assert peak(blocks) < 0.25 * np.abs(stat).max()  # 500 → ≈100 (a flat block would be ≈46)
    np.testing.assert_array_equal(blocks, dm.greedy_rotation(stat, 128, key=0, shared=shared))
    assert not np.allclose(blocks, dm.greedy_rotation(stat, 128, key=1, shared=shared))
    assert np.array_equal(blocks[0], blocks[1]) == shared  # one shared b×b rotation vs one per block


def test_zigzag_hand_example_and_balance():
    np.testing.assert_array_equal(dm.zigzag_permutation(np.arange(1.0, 9.0), 2), [7, 4, 3, 0, 6, 5, 2, 1])
    cm = stats(*planted())[0]
    k = 8
    idx = dm.zigzag_permutation(cm, k)
    np.testing.assert_array_equal(np.sort(idx), np.arange(256))
    before, after = cm.reshape(k, -1), cm[idx].reshape(k, -1)
    assert np.ptp(after.max(1)) < np.ptp(before.max(1))
    assert np.ptp(after.sum(1)) < np.ptp(before.sum(1))
    with pytest.raises(ValueError, match="3 blocks.*256"):
        dm.zigzag_permutation(cm, 3)


def test_smooth_scale_formula_and_clamp():
    s = dm.smooth_scale(np.array([4.0, 1e-9, 9.0]), np.array([1.0, 4.0, 1e-9]), 0.5)
    np.testing.assert_allclose(s, [2.0, np.sqrt(1e-5) / 2, 3.0 / np.sqrt(1e-5)], rtol=1e-12)
    np.testing.assert_allclose(dm.smooth_scale(np.array([8.0]), np.array([2.0]), 1.0), [8.0])
    np.testing.assert_allclose(dm.smooth_scale(np.array([1e-12]), np.array([1e9]), 0.5), [1e-5])  # s ≥ 1e-5
    with pytest.raises(ValueError, match="alpha"):
        dm.smooth_scale(np.ones(2), np.ones(2), -0.1)


@pytest.mark.parametrize(
    "shared,kw",
    [(True, {}), (False, {}), (False, {"smooth": False}), (True, {"permute": False}), (False, {"block": 64})],
)
def test_duquant_map_is_exact_in_float(shared, kw):
    x, w = planted()
    m = duq(shared, **kw)
    types = [type(t) for t in m.maps]
    dropped = {ChannelScale: kw.get("smooth") is False, Permutation: kw.get("permute") is False}
    expect = [t for t in (ChannelScale, Rotation, Permutation, Rotation) if not dropped.get(t, False)]
    assert isinstance(m, Compose) and types == expect
    xt, wt = transformed(m, x, w)
    assert np.linalg.norm(xt @ wt - x @ w) / np.linalg.norm(x @ w) < 1e-4
    assert not np.allclose(xt, x, atol=1.0)  # it really transformed the activations


def test_duquant_map_calib_rows_and_jax_key():
    x, w = planted()
    m = dm.duquant_map(*stats(x, w), block=128, alpha=0.5, key=jax.random.key(0), shared=False, calib=x, steps=64)
    xt, wt = transformed(m, x, w)
    assert np.linalg.norm(xt @ wt - x @ w) / np.linalg.norm(x @ w) < 1e-4
    assert metrics(m, x, w)[1] < metrics(None, x, w)[1]


@pytest.mark.parametrize("shared", [True, False])
def test_duquant_beats_smoothquant_and_hadamard_at_w4a4(shared):
    x, w = planted()
    am, wm = stats(x, w)
    rtn = metrics(None, x, w)
    sq = metrics(ChannelScale(jnp.asarray(dm.smooth_scale(am, wm, 0.5), jnp.float32)), x, w)
    had = metrics(Rotation(jnp.asarray(sylvester(256)[None], jnp.float32)), x, w)
    du = metrics(duq(shared), x, w)
    assert du[0] < min(rtn[0], sq[0], had[0])  # max/median of |x|
    assert du[1] < min(rtn[1], sq[1], had[1])  # W4A4 relative matmul error


def test_validation_errors():
    am, wm = stats(*planted())
    with pytest.raises(ValueError, match="100.*256"):
        dm.duquant_map(am, wm, block=100)
    with pytest.raises(ValueError, match="alpha"):
        dm.duquant_map(am, wm, alpha=1.5)
    bad = am.copy()
    bad[[1, 2]], bad[3] = np.nan, np.inf
    with pytest.raises(ValueError, match="3 non-finite"):
        dm.duquant_map(bad, wm)
    with pytest.raises(ValueError, match="1 non-finite"):
        dm.duquant_map(am, np.where(np.arange(256) == 9, np.nan, wm))
    with pytest.raises(ValueError, match="256"):
        dm.greedy_rotation(am, 96)

"""The pure math of DuQuant (Lin et al. 2024, Hsu1023/DuQuant): smoothing, greedy block rotations, zigzag.

Convention: activations are row vectors (tokens, channels) and every matrix acts on the right, x ↦ x R,
as the reference does (`weight.matmul(R)` on the activation). The result is a linear map of
`qjax.numerics.linear_maps`: y = X W becomes `m.apply(X) @ fold_into_kernel(m, W)`, exact in float.

All calibration math is numpy float64 and deterministic given `key` (an int seed or a jax PRNG key).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from qjax.numerics.linear_maps import ChannelScale, Permutation, Rotation, compose

CLIPMIN = 1e-5


def _rng(key) -> np.random.Generator:
    """A numpy generator seeded from an int or a (typed or raw uint32) jax PRNG key."""
    if isinstance(key, (int, np.integer)):
        return np.random.default_rng(int(key))
    arr = jnp.asarray(key)
    if jnp.issubdtype(arr.dtype, jax.dtypes.prng_key):
        arr = jax.random.key_data(arr)
    return np.random.default_rng(np.asarray(arr, np.uint32).ravel().tolist())


def _swap(m: np.ndarray, i: int, j: int) -> np.ndarray:
    """E m E with E the permutation matrix exchanging indices i and j (rows and columns)."""
    idx = np.arange(m.shape[0])
    idx[[i, j]] = idx[[j, i]]
    return m[idx][:, idx]


def base_rotation(b: int) -> np.ndarray:
    """(b, b) orthogonal matrix whose row 0 is 1/√b·1: x ↦ x R spreads a channel-0 outlier evenly.

    R = G_{b-2} ⋯ G_1 G_0 with G_i the Givens rotation on (i, i+1), cos = 1/√(i+2), sin = √(i+1)/√(i+2)
    ([i, i+1] = −sin, [i+1, i] = sin), which makes row b−1 uniform; rows and columns 0 and b−1 are then
    swapped (as the reference `get_rot.py` does), so the uniform row is row 0 = e₀ R, i.e. the image of
    channel 0 under the row-vector convention x ↦ x R.
    """
    if b < 1:
        raise ValueError(f"block size must be positive, got {b}")
    r = np.eye(b)
    for i in range(b - 1):  # r ← G_i r touches rows i and i+1 only
        c, s = 1 / np.sqrt(i + 2), np.sqrt(i + 1) / np.sqrt(i + 2)
        r[i], r[i + 1] = c * r[i] - s * r[i + 1], s * r[i] + c * r[i + 1]
    return _swap(r, 0, b - 1)


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """Haar-random (n, n) orthogonal matrix (QR of a Gaussian with the sign of diag(R) fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def _greedy_block(stat: np.ndarray, step_rot: np.ndarray, steps: int) -> np.ndarray:
    """Greedy pivots on rows of `stat` (rows, b); returns the accumulated rotation of the best prefix."""
    b = step_rot.shape[0]
    cur, pivots, best_peak, best_len = stat, [], np.abs(stat).max(), 0
    for _ in range(steps):
        pivots.append(int(np.argmax(np.abs(cur))) % b)  # the outlier's *channel* within its block
        cur = cur @ _swap(step_rot, 0, pivots[-1])  # x ↦ x E_c R̃ diag(1, Q′) E_c: c takes the uniform row
        peak = np.abs(cur).max()
        if peak < best_peak:  # strict: the shortest prefix reaching the minimum (reference's argmin)
            best_peak, best_len = peak, len(pivots)
    acc = np.eye(b)
    for c in pivots[:best_len]:
        acc = acc @ _swap(step_rot, 0, c)
    return acc


def greedy_rotation(x_blocks_stat, b: int, steps: int = 256, key=0, shared: bool = False) -> np.ndarray:
    """DuQuant's greedy outlier rotation: blocks (n, b, b) of an orthogonal block-diagonal x ↦ x R.

    `x_blocks_stat` (..., C) is the calibration activation statistic (per-channel max|x|, or activation
    rows such as the reference's mean calibration input), C = n·b. Each step finds the largest-magnitude
    entry, exchanges its channel with position 0 of its block, applies R̃·diag(1, Q′) (R̃ = base_rotation,
    Q′ a seeded random orthogonal of size b−1, drawn once per rotation as the reference's `get_rot`),
    exchanges back and accumulates; of the `steps`+1 prefixes the one with the smallest max|x| is kept
    (the reference scores the range max − min of the signed statistic).

    Pivot: the reference (quantize/quantizer.py `rotation`) takes the *row* index of the argmax of the
    (−1, b)-reshaped statistic (modulo b) as the channel to exchange, which looks like a bug; we pivot
    on the outlier's *channel* (column index), as the paper describes.
    shared=True: the reference code's single b×b rotation for all blocks (statistic reshaped to (−1, b),
    so it pivots on the block holding the global max). shared=False: the paper's block-diagonal matrix,
    every block greedily rotated on its own outliers with its own Q′.
    """
    stat = np.asarray(x_blocks_stat, np.float64)
    c_total = stat.shape[-1]
    if b < 2 or c_total % b:
        raise ValueError(f"block size {b} must be ≥ 2 and divide the channel count {c_total}")
    n, rng, base = c_total // b, _rng(key), base_rotation(b)
    blocks_in = stat.reshape(-1, n, b)

    def step_rot() -> np.ndarray:
        q = np.eye(b)
        q[1:, 1:] = random_orthogonal(b - 1, rng)
        return base @ q

    if shared:
        return np.broadcast_to(_greedy_block(blocks_in.reshape(-1, b), step_rot(), steps), (n, b, b)).copy()
    return np.stack([_greedy_block(blocks_in[:, k], step_rot(), steps) for k in range(n)])


def zigzag_permutation(channel_max, n_blocks: int) -> np.ndarray:
    """Index (output position ← input channel) dealing channels sorted by max|x| to blocks 0..K−1, K−1..0, …

    Each block then holds a similar share of outliers; within a block channels stay in descending order.
    """
    cm = np.asarray(channel_max, np.float64)
    if cm.ndim != 1 or n_blocks < 1 or cm.size % n_blocks:
        raise ValueError(f"{n_blocks} blocks must divide the channel count {cm.size}")
    order = np.argsort(-cm, kind="stable")
    pos = np.arange(cm.size) % (2 * n_blocks)
    block = np.where(pos < n_blocks, pos, 2 * n_blocks - 1 - pos)  # 0..K−1, K−1..0, …
    return np.concatenate([order[block == k] for k in range(n_blocks)])


def smooth_scale(act_absmax, weight_absmax_rows, alpha: float) -> np.ndarray:
    """SmoothQuant s_j = max|X_j|^α / max_i|W_ji|^(1−α), both factors and s clamped ≥ 1e-5 (x ↦ x/s)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    a = np.maximum(np.asarray(act_absmax, np.float64), CLIPMIN)
    w = np.maximum(np.asarray(weight_absmax_rows, np.float64), CLIPMIN)
    return np.maximum(a**alpha / w ** (1.0 - alpha), CLIPMIN)


def _check_finite(name: str, x: np.ndarray) -> None:
    """ValueError naming how many entries of `x` are NaN or infinite."""
    bad = int(np.size(x) - np.isfinite(x).sum())
    if bad:
        raise ValueError(f"{name} has {bad} non-finite values")


def duquant_map(act_absmax, weight_absmax_rows, *, block: int = 128, alpha: float = 0.5, steps: int = 256,
                key=0, shared: bool = False, smooth: bool = True, permute: bool = True, calib=None):  # fmt: skip
    """DuQuant's transform x ↦ x Λ⁻¹ R1 P R2 as compose(ChannelScale, Rotation, Permutation, Rotation).

    act_absmax (C,): per-channel max|x| of the calibration activations; weight_absmax_rows (C,): max over
    output channels of |W| per input channel (W (in, out)). The greedy rotations run on the smoothed
    `calib` rows (..., C) if given (e.g. the mean calibration input, as the reference) else on the smoothed
    act_absmax; P is the zigzag of the per-channel max after R1. smooth/permute=False drop Λ / P.
    """
    a = np.asarray(act_absmax, np.float64)
    w = np.asarray(weight_absmax_rows, np.float64)
    c = a.shape[-1]
    if a.ndim != 1 or w.shape != a.shape:
        raise ValueError(f"act_absmax {a.shape} and weight_absmax_rows {w.shape} must be the same (C,) vector")
    if block < 2 or c % block:
        raise ValueError(f"block size {block} does not divide the channel count {c}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    _check_finite("act_absmax", a)
    _check_finite("weight_absmax_rows", w)
    stat = a if calib is None else np.asarray(calib, np.float64).reshape(-1, c)
    _check_finite("calib", stat)
    scale = smooth_scale(a, w, alpha) if smooth else None
    if scale is not None:
        stat = stat / scale
    k1, k2 = (key, key + 1) if isinstance(key, (int, np.integer)) else tuple(jax.random.split(key))
    r1 = greedy_rotation(stat, block, steps, k1, shared)
    stat = np.einsum("...nb,nbc->...nc", stat.reshape(*stat.shape[:-1], c // block, block), r1).reshape(stat.shape)
    perm = zigzag_permutation(np.abs(stat).reshape(-1, c).max(0), c // block) if permute else None
    if perm is not None:
        stat = stat[..., perm]
    r2 = greedy_rotation(stat, block, steps, k2, shared)
    return compose(
        None if scale is None else ChannelScale(jnp.asarray(scale, jnp.float32)),
        Rotation(jnp.asarray(r1, jnp.float32)),
        None if perm is None else Permutation(jnp.asarray(perm, jnp.int32)),
        Rotation(jnp.asarray(r2, jnp.float32)),
    )

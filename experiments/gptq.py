"""GPTQ (Frantar et al. 2022) on one linear layer: a pure function from (kernel, Hessian, spec) to a packed QArray.

Layout: the kernel is qjax's (in, out); GPTQ's "columns" are the input features, i.e. kernel rows. The
Hessian is H = 2/N Σ x xᵀ over calibration inputs x (in,). The core runs in float64 numpy; each feature
is rounded by `qjax.numerics.round_to_grid`, so every format qjax knows (int, uint, fp8, nf4, fp4) works.

Differences from IST-DASLab/gptq, all deliberate:
- group scales (non-static) come from the *fully* error-updated weights of the group when its first
  feature is reached; the reference reads the block-stale `W`, which differs when a group starts inside a
  lazy block (group size < block size). Here the result does not depend on `block_size`.
- per-channel / per-tensor scales come from the kernel after dead inputs are zeroed (the reference
  measures them before).
- act_order with groups needs `static_groups=True` (group scales from the original weights in the
  original order), so that every contiguous input group keeps one scale, as a QArray stores it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from qjax.numerics import QArray, QuantSpec, quantize
from qjax.numerics.formats import Format
from qjax.numerics.granularity import FULL
from qjax.numerics.quantize import compute_scale
from qjax.numerics.rounding import round_to_grid


@dataclasses.dataclass(frozen=True)
class GPTQInfo:
    """What one GPTQ run did.

    damp: relative damping used (fraction of mean diag H); damp_value: the absolute value added to diag H.
    retries: how many times the damping was multiplied by 10 before the Cholesky succeeded.
    error: Σ (w − q)² / (2 U_ii²), the number the reference prints; equals ½ tr(Δᵀ H_damped Δ) with Δ the
      weight change (kernel layout), i.e. ‖X Δ‖²/N plus ½·damp_value·‖Δ‖² for H = 2/N XᵀX.
    perm: processing order of the input features (descending diag H with act_order), or None.
    dead: number of dead inputs (H_ii == 0) whose kernel rows were zeroed.
    """

    damp: float
    damp_value: float
    retries: int
    error: float
    perm: np.ndarray | None
    dead: int


@functools.partial(jax.jit, static_argnums=1)
def _round(v: jax.Array, fmt: Format) -> jax.Array:
    """One feature's scaled values onto the format's grid (jitted: called once per input feature)."""
    return round_to_grid(v, fmt)


def _scale_np(scale: jax.Array, zero_point: jax.Array | None, t1: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Compact (g, n1) scale / zero point → float32 per-output arrays (g, n_out)."""
    s = np.repeat(np.asarray(scale.astype(jnp.float32)), t1, axis=1)[:, :n_out]
    z = np.zeros_like(s) if zero_point is None else np.repeat(np.asarray(zero_point, np.float32), t1, axis=1)[:, :n_out]
    return s, z


def inverse_cholesky(h: np.ndarray, damp: float, max_retries: int, path: str = "") -> tuple[np.ndarray, float, float, int]:
    """Upper Cholesky factor U of (H + damp·mean(diag H)·I)⁻¹, retrying with damping ×10. Returns (U, damp, value, retries)."""
    mean = float(np.mean(np.diag(h)))
    eye = np.eye(h.shape[0])
    for retry in range(max_retries + 1):
        value = damp * mean
        try:
            # With J the reversal and J·H·J = L·Lᵀ: U = J·L⁻¹·J is upper triangular and UᵀU = H⁻¹ (one factorisation).
            lower = scipy.linalg.cholesky((h + value * eye)[::-1, ::-1], lower=True)
            u = np.ascontiguousarray(scipy.linalg.solve_triangular(lower, eye, lower=True)[::-1, ::-1])
            if np.all(np.isfinite(u)) and np.all(np.diag(u) > 0):
                return u, damp, value, retry
        except (np.linalg.LinAlgError, ValueError):
            pass
        if retry < max_retries:
            damp *= 10
    where = f" for {path!r}" if path else ""
    raise ValueError(
        f"GPTQ{where}: the Cholesky factorisation of the damped inverse Hessian failed after {max_retries} retries "
        f"(last damping {damp:g} × mean diag H = {value:g}); the Hessian is not positive definite or not finite"
    )


def gptq_quantize(
    kernel: jax.Array | np.ndarray,
    hessian: jax.Array | np.ndarray,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    max_damp_retries: int = 3,
    path: str = "",
) -> tuple[QArray, GPTQInfo]:
    """Quantize an (in, out) kernel with GPTQ given H = 2/N Σ x xᵀ (in, in); returns the packed QArray and a GPTQInfo."""
    where = f"{path}: " if path else ""
    kernel = np.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"{where}GPTQ needs a 2-D (in, out) kernel, got shape {kernel.shape}")
    n_in, n_out = kernel.shape
    h = np.array(hessian, np.float64)
    if h.shape != (n_in, n_in):
        raise ValueError(f"{where}Hessian has shape {h.shape}, expected ({n_in}, {n_in}) for a kernel of shape {kernel.shape}")
    if spec.rounding != "nearest":
        raise ValueError(f"{where}GPTQ rounds to nearest; got rounding={spec.rounding!r}")
    if block_size < 1 or damp <= 0 or max_damp_retries < 0:
        raise ValueError(f"{where}need block_size >= 1, damp > 0, max_damp_retries >= 0; got {block_size}, {damp}, {max_damp_retries}")
    if not np.all(np.isfinite(kernel)):
        raise ValueError(f"{where}kernel contains NaN/Inf")
    t0, t1 = spec.granularity.tile_shape(kernel.shape)
    requested = dict((a % 2, s) for a, s in spec.granularity.tiles).get(0, FULL)
    if act_order and requested != FULL and requested > n_in:
        raise ValueError(f"{where}group size {requested} along the input axis is larger than the input dimension {n_in} (act_order)")
    static = static_groups or t0 >= n_in
    if act_order and not static:
        raise ValueError(
            f"{where}act_order with input groups of {t0} needs static_groups=True (scales from the original weights, "
            f"so each contiguous group keeps one scale)"
        )

    w = np.array(kernel, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    n_groups = -(-n_in // t0)
    if static:
        scale, zero_point = compute_scale(jnp.asarray(w, jnp.float32), spec)
        scales, zeros = [scale], [zero_point]
        s_all, z_all = _scale_np(scale, zero_point, t1, n_out)
    else:
        scales, zeros = [], []
        s_all, z_all = np.zeros((n_groups, n_out), np.float32), np.zeros((n_groups, n_out), np.float32)

    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n_in)
    w, h = w[perm], h[perm][:, perm]
    u, damp_used, damp_value, retries = inverse_cholesky(h, damp, max_damp_retries, path)

    q = np.zeros_like(w)
    error = 0.0
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        w1, u1 = w[i1:i2].copy(), u[i1:i2, i1:i2]
        err1 = np.zeros_like(w1)
        for i in range(i2 - i1):
            j = i1 + i
            g = perm[j] // t0
            if not static and j % t0 == 0:  # no act_order here, so perm[j] == j
                end = min(j + t0, n_in)
                slab = np.concatenate([w1[i : end - i1], w[i2:end] - u[i1:i2, i2:end].T @ err1])  # fully updated rows
                scale, zero_point = compute_scale(jnp.asarray(slab, jnp.float32), spec)
                scales.append(scale)
                zeros.append(zero_point)
                s_all[g], z_all[g] = (a[0] for a in _scale_np(scale, zero_point, t1, n_out))
            s, z = s_all[g], z_all[g]
            codes = np.asarray(_round(jnp.asarray((w1[i] / s + z).astype(np.float32)), spec.format))
            q[j] = (codes - z) * s  # float32 arithmetic, exactly as QArray.dequantize
            e = (w1[i] - q[j]) / u1[i, i]
            error += 0.5 * float(e @ e)
            w1[i + 1 :] -= u1[i, i + 1 :, None] * e[None, :]
            err1[i] = e
        w[i2:] -= u[i1:i2, i2:].T @ err1

    q = q[np.argsort(perm)]
    scale = scales[0] if static else jnp.concatenate(scales, axis=0)
    zero_point = None if zeros[0] is None else (zeros[0] if static else jnp.concatenate(zeros, axis=0))
    qa = quantize(jnp.asarray(q, jnp.float32), spec, scale=scale, zero_point=zero_point)
    if np.issubdtype(kernel.dtype, np.floating) or kernel.dtype.name == "bfloat16":
        qa = dataclasses.replace(qa, dtype=jnp.dtype(kernel.dtype).name)  # dequantize() back to the kernel's dtype
    info = GPTQInfo(damp_used, damp_value, retries, error, perm if act_order else None, int(dead.sum()))
    return qa, info

"""W8A8 GEMM as a hand-written Triton kernel, called from JAX through jax-triton (GPU only).

What it does that the Pallas version cannot: masked edge tiles instead of padded copies of the operands
(odd M/N/K cost no extra HBM traffic) and grouped program ordering, so that `GROUP_M` row blocks sweep
the columns together and reuse each weight tile from L2. The autotuner times it against the Pallas
kernel per shape and keeps whichever is faster. The kernel body is plain Triton, so its logic is tested
on CPU with Triton's interpreter; `triton` is imported by this module and `jax_triton` only when called.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl
from qjax.kernels.common import KernelConfig

GROUP_M = 8


@triton.jit
def w8a8_kernel(a_ptr, w_ptr, sa_ptr, sw_ptr, bias_ptr, M, N, K, out_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, RAW: tl.constexpr):  # fmt: skip
    """out[M, N] = (a[M, K] · w[N, K]ᵀ in int32) × sa[M] × sw[N] + bias[N]; RAW stores the int32 sums."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * K + rk[None, :]
    w_ptrs = w_ptr + rn[None, :] * K + rk[:, None]  # a (BLOCK_K, BLOCK_N) view of the K-major weight
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0)
        w = tl.load(w_ptrs, mask=(rn[None, :] < N) & (rk[:, None] < k_left), other=0)
        acc += tl.dot(a, w, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    out_ptrs = out_ptr + rm[:, None] * N + rn[None, :]
    if RAW:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
        sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0)
        out = acc.to(tl.float32) * sa[:, None] * sw[None, :] + bias[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


def launch_grid(m: int, n: int, config: KernelConfig) -> tuple[int]:
    bm, bn, _ = config.blocks
    return (triton.cdiv(m, bm) * triton.cdiv(n, bn),)


def w8a8_matmul_triton(a: jax.Array, a_scale: jax.Array, w: jax.Array, w_scale: jax.Array, bias: jax.Array | None,
                       *, out_dtype, config: KernelConfig, raw_int32: bool = False) -> jax.Array:  # fmt: skip
    """The jax-triton call of `w8a8_kernel` ((M, K) int8 × (N, K) int8, per-token × per-channel scales)."""
    import jax_triton as jt  # GPU-only dependency: imported when a GPU run picks this backend

    m, k = a.shape
    n = w.shape[0]
    bm, bn, bk = config.blocks
    bias = jnp.zeros((n,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    return jt.triton_call(
        a, w, a_scale.astype(jnp.float32), w_scale.astype(jnp.float32), bias, m, n, k,
        kernel=w8a8_kernel, out_shape=jax.ShapeDtypeStruct((m, n), jnp.int32 if raw_int32 else out_dtype),
        grid=launch_grid(m, n, config), num_warps=config.num_warps, num_stages=config.num_stages,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, RAW=raw_int32,
    )  # fmt: skip

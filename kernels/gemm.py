"""Pallas GEMM kernels: W8A8 (int8×int8→int32, scales and bias fused) and weight-only W8A16 / W4A16.

Weights are stored K-major, (N, K), as 8-bit MMAs on Hopper want; int4 weights are packed two per
byte in a kernel layout that pairs column k with column k + block_k/2 of the same K block, so the
kernel unpacks each byte into two contiguous half-tiles without any interleaving shuffle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from qjax.kernels.common import (
    KernelConfig,
    choose_config,
    interpret_default,
    is_traced,
    jax_triton_available,
    pad_to,  # fmt: skip
    pallas_call,
    round_up,
)

C = KernelConfig
W8A8_CONFIGS = (C((128, 128, 128), 4, 3), C((128, 256, 128), 8, 3), C((64, 128, 128), 4, 4), C((128, 128, 64), 4, 4),
                C((256, 128, 128), 8, 3), C((64, 64, 64), 4, 2))  # fmt: skip
"""Candidates (block_m, block_n, block_k), warps, stages: the tuner times those that fit each shape."""
W8A8_TRITON_CONFIGS = tuple(C(c.blocks, c.num_warps, c.num_stages, backend="triton") for c in W8A8_CONFIGS[:4])
"""The same tiles for the hand-written Triton kernel (`triton_gemm`), timed against Pallas on GPU."""
WEIGHT_ONLY_CONFIGS = (C((64, 128), 4, 3), C((16, 128), 4, 4), C((128, 128), 8, 3), C((32, 256), 4, 3), C((16, 64), 4, 4))
"""Candidates (block_m, block_n), warps, stages; small block_m suits decoding (M = batch)."""


# ---- W8A8 --------------------------------------------------------------------------------------------


def _w8a8_kernel(a_ref, w_ref, sa_ref, sw_ref, b_ref, o_ref, *, block_k: int, n_k: int, raw: bool):
    def body(i, acc):
        a = a_ref[:, pl.ds(i * block_k, block_k)]
        w = w_ref[:, pl.ds(i * block_k, block_k)]
        return acc + jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)

    acc = jax.lax.fori_loop(0, n_k, body, jnp.zeros(o_ref.shape, jnp.int32))
    if raw:
        o_ref[...] = acc
        return
    out = acc.astype(jnp.float32) * sa_ref[...] * sw_ref[...] + b_ref[...]
    o_ref[...] = out.astype(o_ref.dtype)


def _w8a8_grouped_kernel(a_ref, w_ref, sa_ref, sw_ref, b_ref, o_ref, *, group: int, n_k: int):
    def body(i, acc):
        a = a_ref[:, pl.ds(i * group, group)]
        w = w_ref[:, pl.ds(i * group, group)]
        part = jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
        return acc + part.astype(jnp.float32) * sw_ref[:, pl.ds(i, 1)].T  # the group's weight scale, per column

    acc = jax.lax.fori_loop(0, n_k, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = (acc * sa_ref[...] + b_ref[...]).astype(o_ref.dtype)


def w8a8_matmul(
    a: jax.Array,
    a_scale: jax.Array,
    w: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    *,
    out_dtype=jnp.bfloat16,
    group_size: int | None = None,
    blocks: tuple[int, int, int] | None = None,
    raw_int32: bool = False,
    poison: bool = False,
    interpret: bool | None = None,
) -> jax.Array:
    """(M, K) int8 activations [per-token scales (M,)] × (N, K) int8 weights [per-channel (N,) or
    per-group (N, K/group) scales] → (M, N) `out_dtype`, int32 accumulation, scales + bias fused.

    raw_int32=True returns the int32 accumulator itself (for bit-exact tests). poison=True fills the
    output buffer with NaN/min-int before the kernel runs, so an unwritten tile cannot go unnoticed.
    `blocks` fixes (block_m, block_n, block_k) (or a whole `KernelConfig`); by default the autotuner picks.
    """
    m, k = a.shape
    n, k2 = w.shape
    if k != k2:
        raise ValueError(f"w8a8_matmul: a is (M, K)=({m}, {k}) but w is (N, K)=({n}, {k2}); store weights K-major")
    if a.dtype != jnp.int8 or w.dtype != jnp.int8:
        raise TypeError(f"w8a8_matmul needs int8 operands, got {a.dtype} and {w.dtype}")
    grouped = group_size is not None
    if grouped and (group_size < 16 or group_size & (group_size - 1) or k % group_size):
        raise ValueError(f"group_size must be a power of two ≥ 16 that divides K={k}, got {group_size}")
    interpret = interpret_default(interpret)

    def run(cfg: KernelConfig):
        if cfg.backend == "triton":
            if grouped:
                raise ValueError("the Triton W8A8 kernel takes per-channel weight scales; use the Pallas backend for groups")
            from qjax.kernels.triton_gemm import w8a8_matmul_triton

            return w8a8_matmul_triton(a, a_scale, w, w_scale, bias, out_dtype=out_dtype, config=cfg, raw_int32=raw_int32)
        bm, bn, bk = cfg.blocks
        bk = group_size if grouped else bk
        mp, np_, kp = round_up(m, bm), round_up(n, bn), round_up(k, bk)
        ap, wp = pad_to(a, (mp, kp)), pad_to(w, (np_, kp))
        sa = pad_to(a_scale.astype(jnp.float32).reshape(m, 1), (mp, 1))
        if grouped:
            sw = pad_to(w_scale.astype(jnp.float32).reshape(n, -1), (np_, kp // bk))
            sw_spec = pl.BlockSpec((bn, kp // bk), lambda i, j: (j, 0))
        else:
            sw = pad_to(w_scale.astype(jnp.float32).reshape(1, n), (1, np_))
            sw_spec = pl.BlockSpec((1, bn), lambda i, j: (0, j))
        b = pad_to((jnp.zeros((n,)) if bias is None else bias).astype(jnp.float32).reshape(1, n), (1, np_))
        odt = jnp.int32 if raw_int32 else out_dtype
        if grouped:
            kernel = functools.partial(_w8a8_grouped_kernel, group=bk, n_k=kp // bk)
        else:
            kernel = functools.partial(_w8a8_kernel, block_k=bk, n_k=kp // bk, raw=raw_int32)
        in_specs = [
            pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
            pl.BlockSpec((bn, kp), lambda i, j: (j, 0)),
            pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
            sw_spec,
            pl.BlockSpec((1, bn), lambda i, j: (0, j)),
        ]
        out = pallas_call(
            kernel, [ap, wp, sa, sw, b],
            out_shape=jax.ShapeDtypeStruct((mp, np_), odt),
            grid=(mp // bm, np_ // bn),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
            interpret=interpret,
            name="qjax_w8a8_grouped" if grouped else "qjax_w8a8",
            config=cfg,
            poison=poison,
            fill=jnp.iinfo(jnp.int32).min if raw_int32 else jnp.nan,
        )  # fmt: skip
        return out[:m, :n]

    candidates = W8A8_CONFIGS
    if not grouped and not interpret and jax_triton_available():
        candidates += W8A8_TRITON_CONFIGS
    return run(choose_config(blocks, candidates, (m, n, k), ("w8a8", m, n, k, group_size, raw_int32, str(out_dtype)),
                            run, is_traced(a, w, a_scale, w_scale)))  # fmt: skip


# ---- weight-only ---------------------------------------------------------------------------------------


def pack_int4_kernel_layout(codes: jax.Array, block_k: int) -> jax.Array:
    """(N, K) int4 codes (int8 in [-8, 7]) → (N, K/2) uint8: in each K block, byte j holds column j (low
    nibble) and column j + block_k/2 (high nibble)."""
    n, k = codes.shape
    if k % block_k or block_k % 2:
        raise ValueError(f"K={k} must be a multiple of an even block_k={block_k} (pad the weight first)")
    c = codes.astype(jnp.uint8).reshape(n, k // block_k, 2, block_k // 2) & 0xF
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2)


def _woq_kernel(x_ref, w_ref, s_ref, b_ref, o_ref, *, block_k: int, n_k: int, group: int, int4: bool):
    def dequant(w, first_col):
        """int → float32 for a (bn, cols) weight tile whose first K column is `first_col`."""
        bn, cols = w.shape
        if cols <= group:  # the tile lies inside one group (groups are aligned to block_k)
            return w.astype(jnp.float32) * s_ref[:, pl.ds(first_col // group, 1)]
        s = s_ref[:, pl.ds(first_col // group, cols // group)]
        return (w.astype(jnp.float32).reshape(bn, cols // group, group) * s[:, :, None]).reshape(bn, cols)

    def xw(first_col, cols, w):
        x = x_ref[:, pl.ds(first_col, cols)].astype(jnp.float32)
        return jax.lax.dot_general(x, dequant(w, first_col), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    def body(i, acc):
        if not int4:
            return acc + xw(i * block_k, block_k, w_ref[:, pl.ds(i * block_k, block_k)])
        half = block_k // 2
        packed = w_ref[:, pl.ds(i * half, half)]
        lo = ((packed & 0xF).astype(jnp.int8) << 4) >> 4  # sign-extend the low nibble
        hi = packed.astype(jnp.int8) >> 4
        return acc + xw(i * block_k, half, lo) + xw(i * block_k + half, half, hi)

    acc = jax.lax.fori_loop(0, n_k, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = (acc + b_ref[...]).astype(o_ref.dtype)


def weight_only_matmul(
    x: jax.Array,
    w: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    *,
    bits: int = 8,
    group_size: int = 128,
    blocks: tuple[int, int] | KernelConfig | None = None,
    block_k: int | None = None,
    poison: bool = False,
    interpret: bool | None = None,
) -> jax.Array:
    """(M, K) bf16/f32 activations × (N, K) int8 [bits=8] or (N, K/2) packed int4 [bits=4, from
    `pack_int4_kernel_layout` with the same `block_k`] weights with per-group scales (N, K/group) → (M, N)
    in x's dtype. `blocks` fixes (block_m, block_n); by default the autotuner picks."""
    m, k = x.shape
    n = w.shape[0]
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two ≥ 16, got {group_size}")
    block_k = block_k or max(group_size, 128)
    if block_k % group_size:
        raise ValueError(f"block_k ({block_k}) must be a multiple of group_size ({group_size})")
    if bits == 4 and w.shape[1] * 2 != round_up(k, block_k):
        raise ValueError(f"packed int4 weight has {w.shape[1]} bytes per row; expected {round_up(k, block_k) // 2} "
                         f"(K padded to block_k={block_k})")  # fmt: skip
    if w_scale.shape != (n, -(-k // group_size)):
        raise ValueError(f"w_scale has shape {w_scale.shape}; expected (N, ceil(K/group)) = ({n}, {-(-k // group_size)})")
    interpret = interpret_default(interpret)

    def run(cfg: KernelConfig):
        bm, bn = cfg.blocks
        mp, np_, kp = round_up(m, bm), round_up(n, bn), round_up(k, block_k)
        xp = pad_to(x, (mp, kp))
        wp = pad_to(w, (np_, kp if bits == 8 else kp // 2))
        sp = pad_to(w_scale.astype(jnp.float32), (np_, kp // group_size), value=1.0)
        b = pad_to((jnp.zeros((n,)) if bias is None else bias).astype(jnp.float32).reshape(1, n), (1, np_))
        kernel = functools.partial(_woq_kernel, block_k=block_k, n_k=kp // block_k, group=group_size, int4=bits == 4)
        in_specs = [
            pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
            pl.BlockSpec((bn, wp.shape[1]), lambda i, j: (j, 0)),
            pl.BlockSpec((bn, sp.shape[1]), lambda i, j: (j, 0)),
            pl.BlockSpec((1, bn), lambda i, j: (0, j)),
        ]
        out = pallas_call(
            kernel, [xp, wp, sp, b],
            out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
            grid=(mp // bm, np_ // bn),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
            interpret=interpret,
            name=f"qjax_w{bits}a16",
            config=cfg,
            poison=poison,
        )  # fmt: skip
        return out[:m, :n]

    key = ("weight_only", bits, m, n, k, group_size, block_k, str(x.dtype))
    return run(choose_config(blocks, WEIGHT_ONLY_CONFIGS, (m, n), key, run, is_traced(x, w, w_scale)))

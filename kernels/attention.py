"""INT8 blockwise flash attention (forward) in Pallas, after INT-FlashAttention and SageAttention.

Q and K are int8 with per-token scales; S = (q·kᵀ in int32) × q_scale × k_scale × sm_scale·log2(e),
then exp2 with an online (running-max) softmax. Two PV variants:
  - "int8": P in [0, 1] is stored as round(127·p) in int8 and V is int8 with per-channel scales;
    PV in int32, rescaled by v_scale/127. The row sum uses the unquantized p.
  - "bf16": P and V in bf16 (V unquantized), f32 accumulation.
Causal masking (queries aligned to the end of the key sequence), per-batch key lengths, and GQA
(query head h reads key/value head h // (H / Hkv)). K smoothing (subtract K's mean over the sequence,
exact for softmax) happens before K is quantized, in `quantize_qkv`.
Layouts: q (B, H, T, D), k/v (B, Hkv, S, D); scales q (B, H, T), k (B, Hkv, S), v (B, Hkv, D).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from qjax.kernels.common import interpret_default, pad_to, pallas_call, round_up

from qjax.numerics import QuantSpec, per_axis, per_token, quantize

LOG2E = math.log2(math.e)
MASKED = -1e30


def _flash_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, vs_ref, len_ref, o_ref, *, block_q: int, block_k: int,
                  n_k: int, sm_scale: float, causal: bool, offset: int, pv: str):  # fmt: skip
    qi = pl.program_id(2)
    q = q_ref[...]  # (bq, D) int8
    qs = qs_ref[...].reshape(block_q, 1) * (sm_scale * LOG2E)  # fold constants into the exp2 argument
    kv_len = len_ref[0, 0]
    q_pos = qi * block_q + jnp.arange(block_q)[:, None] + offset  # absolute positions of the queries
    d = q.shape[-1]

    def body(j, carry):
        m, row_sum, acc = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]
        ks = ks_ref[:, pl.ds(j * block_k, block_k)]  # (1, bk)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
        s = s.astype(jnp.float32) * qs * ks
        k_pos = j * block_k + jnp.arange(block_k)[None, :]
        keep = k_pos < kv_len
        if causal:
            keep = keep & (k_pos <= q_pos)
        s = jnp.where(keep, s, MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(keep, jnp.exp2(s - m_new), 0.0)
        alpha = jnp.exp2(m - m_new)
        row_sum = row_sum * alpha + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[pl.ds(j * block_k, block_k), :]
        if pv == "int8":
            p8 = jnp.floor(p * 127.0 + 0.5).astype(jnp.int8)
            pv_ = jax.lax.dot_general(p8, v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32).astype(jnp.float32)
        else:
            pv_ = jax.lax.dot_general(p.astype(jnp.bfloat16), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return m_new, row_sum, acc * alpha + pv_

    if causal:  # blocks entirely above the diagonal contribute nothing
        last = (qi + 1) * block_q + offset
        n_iter = jnp.minimum(n_k, (last + block_k - 1) // block_k)
    else:
        n_iter = n_k
    init = (jnp.full((block_q, 1), MASKED, jnp.float32), jnp.zeros((block_q, 1), jnp.float32), jnp.zeros((block_q, d), jnp.float32))
    _, row_sum, acc = jax.lax.fori_loop(0, n_iter, body, init)
    if pv == "int8":
        acc = acc * (vs_ref[...] / 127.0)
    o_ref[...] = jnp.where(row_sum > 0, acc / jnp.where(row_sum > 0, row_sum, 1.0), 0.0).astype(o_ref.dtype)


def int8_flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_scale: jax.Array,
    k_scale: jax.Array,
    v_scale: jax.Array | None = None,
    *,
    kv_lengths: jax.Array | None = None,
    causal: bool = False,
    sm_scale: float | None = None,
    pv: str = "int8",
    block_q: int = 64,
    block_k: int = 64,
    out_dtype=jnp.bfloat16,
    poison: bool = False,
    interpret: bool | None = None,
) -> jax.Array:
    """Forward INT8 attention; returns (B, H, T, D) in `out_dtype` (see the module docstring)."""
    b, h, t, d = q.shape
    _, hkv, s, _ = k.shape
    if q.dtype != jnp.int8 or k.dtype != jnp.int8:
        raise TypeError(f"q and k must be int8, got {q.dtype}, {k.dtype}")
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    if pv not in ("int8", "bf16"):
        raise ValueError(f"pv must be 'int8' or 'bf16', got {pv!r}")
    if pv == "int8" and (v.dtype != jnp.int8 or v_scale is None):
        raise TypeError("pv='int8' needs int8 v and per-channel v_scale (B, Hkv, D)")
    if d % 16 or d > 256:
        raise ValueError(f"head dim must be a multiple of 16 up to 256, got {d}")
    interpret = interpret_default(interpret)
    groups = h // hkv
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    bq, bk = min(block_q, round_up(t, 16)), min(block_k, round_up(s, 16))
    tp, sp = round_up(t, bq), round_up(s, bk)
    qp = pad_to(q, (b, h, tp, d))
    kp = pad_to(k, (b, hkv, sp, d))
    vp = pad_to(v if pv == "int8" else v.astype(jnp.bfloat16), (b, hkv, sp, d))
    qsp = pad_to(q_scale.astype(jnp.float32), (b, h, tp)).reshape(b, h, 1, tp)
    ksp = pad_to(k_scale.astype(jnp.float32), (b, hkv, sp)).reshape(b, hkv, 1, sp)
    vsp = (jnp.ones((b, hkv, d)) if v_scale is None else v_scale).astype(jnp.float32).reshape(b, hkv, 1, d)
    lengths = jnp.full((b,), s, jnp.int32) if kv_lengths is None else kv_lengths.astype(jnp.int32)
    lengths = lengths.reshape(b, 1, 1)
    kernel = functools.partial(_flash_kernel, block_q=bq, block_k=bk, n_k=sp // bk, sm_scale=sm_scale, causal=causal,
                               offset=s - t, pv=pv)  # fmt: skip
    sq = pl.squeezed if hasattr(pl, "squeezed") else None
    in_specs = [
        pl.BlockSpec((sq, sq, bq, d), lambda bi, hi, qi: (bi, hi, qi, 0)),
        pl.BlockSpec((sq, sq, sp, d), lambda bi, hi, qi: (bi, hi // groups, 0, 0)),
        pl.BlockSpec((sq, sq, sp, d), lambda bi, hi, qi: (bi, hi // groups, 0, 0)),
        pl.BlockSpec((sq, sq, 1, bq), lambda bi, hi, qi: (bi, hi, 0, qi)),
        pl.BlockSpec((sq, sq, 1, sp), lambda bi, hi, qi: (bi, hi // groups, 0, 0)),
        pl.BlockSpec((sq, sq, 1, d), lambda bi, hi, qi: (bi, hi // groups, 0, 0)),
        pl.BlockSpec((sq, 1, 1), lambda bi, hi, qi: (bi, 0, 0)),
    ]
    out = pallas_call(
        kernel, [qp, kp, vp, qsp, ksp, vsp, lengths],
        out_shape=jax.ShapeDtypeStruct((b, h, tp, d), out_dtype),
        grid=(b, h, tp // bq),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((sq, sq, bq, d), lambda bi, hi, qi: (bi, hi, qi, 0)),
        interpret=interpret,
        name=f"qjax_int8_flash_{pv}",
        poison=poison,
    )  # fmt: skip
    return out[:, :, :t]


def quantize_qkv(q, k, v, *, pv: str = "int8", k_smooth: bool = True):
    """Per-token symmetric int8 Q and K (K mean-smoothed first), V int8 per channel or bf16.

    Inputs (B, H, T, D) / (B, Hkv, S, D) float; returns (q8, k8, v', q_scale, k_scale, v_scale).
    """
    if k_smooth:
        k = k - jnp.mean(k, axis=2, keepdims=True)
    token = QuantSpec("int8", per_token())
    qq, kq = quantize(q.astype(jnp.float32), token), quantize(k.astype(jnp.float32), token)
    qs, ks = qq.scale[..., 0], kq.scale[..., 0]
    if pv == "bf16":
        return qq.values, kq.values, v.astype(jnp.bfloat16), qs, ks, None
    vq = quantize(v.astype(jnp.float32), QuantSpec("int8", per_axis(0, 1, 3)))  # per channel, over the sequence
    return qq.values, kq.values, vq.values, qs, ks, vq.scale[:, :, 0, :]

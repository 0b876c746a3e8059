"""INT8 blockwise flash attention (forward) in Pallas, after INT-FlashAttention and SageAttention.

Q and K are int8 with per-token (or per-block: constant over blocks of tokens) scales;
S = (q·kᵀ in int32) × q_scale × k_scale × sm_scale·log2(e), then exp2 with an online (running-max)
softmax. Three PV variants, each with its P scale folded into the exp2 argument (the exp/convert
units, not the tensor cores, bound this kernel):
  - "int8" (INT-FlashAttention): P in [0, 127] rounded to int8, V int8 with per-channel scales; PV in int32.
  - "fp8" (SageAttention2): P in [0, 448] cast to fp8 e4m3, V fp8 e4m3 per channel; PV in f32.
  - "bf16" (SageAttention1): P and V in bf16 (V unquantized), f32 accumulation.
The row sum accumulates the unquantized (scaled) p, so the P scale cancels in the final division.
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
from qjax.kernels.common import (
    KernelConfig,
    choose_config,
    interpret_default,
    is_traced,
    pad_to,
    pallas_call,
    round_up,  # fmt: skip
)

from qjax.numerics import QuantSpec, get_format, per_axis, per_block, per_token, quantize

LOG2E = math.log2(math.e)
MASKED = -1e30
PV_FORMATS = {"int8": "int8", "fp8": "fp8_e4m3", "bf16": None}
"""PV variant → the format of P and V (None: bf16, V unquantized)."""


def p_scale(pv: str) -> float:
    """The constant P in [0, 1] is multiplied by before it is cast (folded into exp2): its format's max."""
    fmt = PV_FORMATS[pv]
    return 1.0 if fmt is None else float(get_format(fmt).max_value)


def _check_pv(pv: str) -> None:
    if pv not in PV_FORMATS:
        raise ValueError(f"pv must be one of {sorted(PV_FORMATS)}, got {pv!r}")
C = KernelConfig
ATTENTION_CONFIGS = (C((128, 64), 4, 3), C((128, 128), 8, 2), C((64, 64), 4, 2), C((64, 128), 4, 2), C((128, 32), 4, 3))
"""Candidates (block_q, block_k), warps, stages for the autotuner."""


def _flash_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, vs_ref, len_ref, o_ref, *, block_q: int, block_k: int,
                  n_k: int, sm_scale: float, causal: bool, offset: int, pv: str):  # fmt: skip
    qi = pl.program_id(2)
    q = q_ref[...]  # (bq, D) int8
    qs = qs_ref[...].reshape(block_q, 1) * (sm_scale * LOG2E)  # fold constants into the exp2 argument
    log2_p_scale = math.log2(p_scale(pv))  # P's cast scale, folded in as well
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
        p = jnp.where(keep, jnp.exp2(s - (m_new - log2_p_scale)), 0.0)  # in [0, P scale]
        alpha = jnp.exp2(m - m_new)
        row_sum = row_sum * alpha + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[pl.ds(j * block_k, block_k), :]
        if pv == "int8":
            p8 = jnp.floor(p + 0.5).astype(jnp.int8)
            pv_ = jax.lax.dot_general(p8, v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32).astype(jnp.float32)
        else:
            p_cast = p.astype(v.dtype)  # fp8 e4m3 or bf16
            pv_ = jax.lax.dot_general(p_cast, v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return m_new, row_sum, acc * alpha + pv_

    if causal:  # blocks entirely above the diagonal contribute nothing
        last = (qi + 1) * block_q + offset
        n_iter = jnp.minimum(n_k, (last + block_k - 1) // block_k)
    else:
        n_iter = n_k
    init = (jnp.full((block_q, 1), MASKED, jnp.float32), jnp.zeros((block_q, 1), jnp.float32), jnp.zeros((block_q, d), jnp.float32))
    _, row_sum, acc = jax.lax.fori_loop(0, n_iter, body, init)
    if pv != "bf16":
        acc = acc * vs_ref[...]
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
    blocks: tuple[int, int] | KernelConfig | None = None,
    out_dtype=jnp.bfloat16,
    poison: bool = False,
    interpret: bool | None = None,
) -> jax.Array:
    """Forward INT8 attention; returns (B, H, T, D) in `out_dtype` (see the module docstring).

    `blocks` fixes (block_q, block_k) (or a whole `KernelConfig`); by default the autotuner picks.
    """
    b, h, t, d = q.shape
    _, hkv, s, _ = k.shape
    if q.dtype != jnp.int8 or k.dtype != jnp.int8:
        raise TypeError(f"q and k must be int8, got {q.dtype}, {k.dtype}")
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    _check_pv(pv)
    v_dtype = None if PV_FORMATS[pv] is None else get_format(PV_FORMATS[pv]).storage_dtype
    if v_dtype is not None and (v.dtype != v_dtype or v_scale is None):
        raise TypeError(f"pv={pv!r} needs {jnp.dtype(v_dtype).name} v and per-channel v_scale (B, Hkv, D); got {v.dtype}")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two in [16, 256], got {d}")
    if q_scale.shape != (b, h, t) or k_scale.shape != (b, hkv, s):
        raise ValueError(f"scales must be per token: q_scale {q_scale.shape} vs {(b, h, t)}, k_scale {k_scale.shape} vs {(b, hkv, s)}")
    interpret = interpret_default(interpret)
    groups = h // hkv
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    lengths = jnp.full((b,), s, jnp.int32) if kv_lengths is None else kv_lengths.astype(jnp.int32)
    lengths = lengths.reshape(b, 1, 1)
    vsp = (jnp.ones((b, hkv, d)) if v_scale is None else v_scale).astype(jnp.float32).reshape(b, hkv, 1, d)
    vp_dtype = v_dtype or jnp.bfloat16

    def run(cfg: KernelConfig):
        bq, bk = cfg.blocks
        tp, sp = round_up(t, bq), round_up(s, bk)
        qp = pad_to(q, (b, h, tp, d))
        kp = pad_to(k, (b, hkv, sp, d))
        vp = pad_to(v.astype(vp_dtype), (b, hkv, sp, d))
        qsp = pad_to(q_scale.astype(jnp.float32), (b, h, tp)).reshape(b, h, 1, tp)
        ksp = pad_to(k_scale.astype(jnp.float32), (b, hkv, sp)).reshape(b, hkv, 1, sp)
        kernel = functools.partial(_flash_kernel, block_q=bq, block_k=bk, n_k=sp // bk, sm_scale=sm_scale,
                                   causal=causal, offset=s - t, pv=pv)  # fmt: skip
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
            config=cfg,
            poison=poison,
        )  # fmt: skip
        return out[:, :, :t]

    key = ("int8_attention", pv, b, h, hkv, t, s, d, causal, str(out_dtype))
    return run(choose_config(blocks, ATTENTION_CONFIGS, (t, s), key, run, is_traced(q, k, v, q_scale, k_scale)))


def quantize_qkv(q, k, v, *, pv: str = "int8", k_smooth: bool = True, block: int | None = None):
    """Symmetric int8 Q and K (K mean-smoothed first), and V as the PV variant wants: int8 or fp8 e4m3 per
    channel, or bf16. Q/K scales are per token, or with `block` one per `block` consecutive tokens
    (SageAttention's per-block granularity), returned expanded to per token as the kernel takes them.

    Inputs (B, H, T, D) / (B, Hkv, S, D) float; returns (q8, k8, v', q_scale, k_scale, v_scale).
    """
    _check_pv(pv)
    if k_smooth:
        k = k - jnp.mean(k, axis=2, keepdims=True)

    def qk(x):
        if block is None:
            xq = quantize(x.astype(jnp.float32), QuantSpec("int8", per_token()))
            return xq.values, xq.scale[..., 0]
        xq = quantize(x.astype(jnp.float32), QuantSpec("int8", per_block({2: block, 3: x.shape[3]})))
        t = x.shape[2]  # values are padded to whole blocks
        return xq.values[:, :, :t], jnp.repeat(xq.scale[..., 0], block, axis=2)[:, :, :t]

    (q8, qs), (k8, ks) = qk(q), qk(k)
    if PV_FORMATS[pv] is None:
        return q8, k8, v.astype(jnp.bfloat16), qs, ks, None
    vq = quantize(v.astype(jnp.float32), QuantSpec(PV_FORMATS[pv], per_axis(0, 1, 3)))  # per channel, over the sequence
    return q8, k8, vq.values, qs, ks, vq.scale[:, :, 0, :]

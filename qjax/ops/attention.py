"""Quantized dot-product attention with GQA: Q/K/V/P operand specs, fake or integer path.

Layouts: q (B, T, H, D), k and v (B, S, Hkv, D) with H a multiple of Hkv (GQA/MQA). Specs refer to
these layouts (e.g. per-token `per_token()`, per-head `per_axis(2)`); P (B, H, T, S) can be quantized
with a spec or the fixed 1/127 scale of INT-FlashAttention (`p_scale=1/127`). `k_smooth` subtracts
the per-channel mean of K over the sequence first (SageAttention; softmax is invariant to it).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qjax.numerics import QArray, QuantSpec, fake_quant, per_axis, per_token, quantize
from qjax.ops.dot_general import integer_dot_general, use_kernels_default

NEG_INF = -1e30


def causal_mask(t: int, s: int) -> jax.Array:
    """(T, S) mask for T new queries at the last T positions of an S-long key sequence."""
    return jnp.arange(s)[None, :] <= (jnp.arange(t)[:, None] + (s - t))


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    q_spec: QuantSpec | None = None,
    k_spec: QuantSpec | None = None,
    v_spec: QuantSpec | None = None,
    p_spec: QuantSpec | None = None,
    p_scale: float | None = None,
    k_smooth: bool = False,
    mode: str = "fake",
    kv_lengths: jax.Array | None = None,
    use_kernels: bool | None = None,
) -> jax.Array:
    """softmax(q kᵀ · scale + mask) v with quantized operands; returns (B, T, H, D) in q's dtype.

    kv_lengths (B,): valid keys per batch element (a padding mask the kernel understands). In the
    integer path, INT-FlashAttention's configuration (int8 per-token Q/K, int8 V per channel, P with
    the fixed 1/127 scale, no other mask) and SageAttention2's (the same with fp8 e4m3 V per channel and
    P at 1/448) run the Pallas kernel when `use_kernels` (default: on GPU).
    """
    b, t, h, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention shapes: q {q.shape}, k {k.shape}, v {v.shape} (expected (B,T,H,D), (B,S,Hkv,D))")
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    if mode not in ("fake", "int"):
        raise ValueError(f"mode must be 'fake' or 'int', got {mode!r}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if k_smooth:
        k = k - jnp.mean(k, axis=1, keepdims=True)
    pv = _kernel_variant(q_spec, k_spec, v_spec, p_spec, p_scale) if mode == "int" and mask is None else None
    if pv is not None and use_kernels_default(use_kernels):
        return _flash_kernel_path(q, k, v, q_spec, k_spec, v_spec, pv, causal, scale, kv_lengths)
    if kv_lengths is not None:
        valid = (jnp.arange(s_len)[None, :] < kv_lengths[:, None])[:, None, None, :]
        mask = valid if mask is None else mask & valid
    keep = _combined_mask(mask, causal, b, h, t, s_len)
    out_dtype = q.dtype

    is_int = lambda spec: spec is not None and spec.format.kind == "int"  # noqa: E731
    if mode == "int" and is_int(q_spec) and is_int(k_spec):
        qq, kq = quantize(q, q_spec), repeat_heads(quantize(k, k_spec), h // hkv)
        scores = integer_dot_general(qq, kq, (((3,), (3,)), ((0, 2), (0, 2))))  # (B, H, T, S)
    else:
        qf = q if q_spec is None else fake_quant(q, q_spec)
        kf = k if k_spec is None else fake_quant(k, k_spec)
        kf = jnp.repeat(kf, h // hkv, axis=2)
        scores = jnp.einsum("bthd,bshd->bhts", qf.astype(jnp.float32), kf.astype(jnp.float32))
    scores = jnp.where(keep, scores * scale, NEG_INF)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.where(keep, jnp.exp(scores - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)  # the row sum uses the unquantized p (as INT-FlashAttention)

    p_static = None
    if p_scale is not None:  # a fixed P scale (e.g. 1/127): int8 unless another P format is given
        p_spec = p_spec or QuantSpec("int8")
        p_static = jnp.full((1,) * 4, p_scale, jnp.float32)
    if mode == "int" and is_int(v_spec) and is_int(p_spec):
        pq = quantize(p, p_spec, scale=p_static)
        vq = repeat_heads(quantize(v, v_spec), h // hkv)
        o = integer_dot_general(pq, vq, (((3,), (1,)), ((0, 1), (0, 2))))  # (B, H, T, D)
    else:
        pf = p if p_spec is None else fake_quant(p, p_spec, scale=p_static)
        vf = v if v_spec is None else fake_quant(v, v_spec)
        vf = jnp.repeat(vf, h // hkv, axis=2).astype(jnp.float32)
        o = jnp.einsum("bhts,bshd->bhtd", pf, vf)
    o = o / jnp.where(denom > 0, denom, 1.0)
    return o.transpose(0, 2, 1, 3).astype(out_dtype)


def _kernel_variant(q_spec, k_spec, v_spec, p_spec, p_scale) -> str | None:
    """The flash-attention kernel's PV variant ("int8" or "fp8") when the specs are exactly what it
    computes, else None: int8 per-token Q/K; V per channel with P at the fixed 1/127 scale in int8
    (INT-FlashAttention) or 1/448 in fp8 e4m3 (SageAttention2)."""
    def plain(spec, fmt):
        return spec is not None and spec.format.name == fmt and spec.symmetric and spec.scale_mode == "float"

    token = per_token()
    if not (plain(q_spec, "int8") and plain(k_spec, "int8") and q_spec.granularity == token and k_spec.granularity == token):
        return None
    if v_spec is None or v_spec.granularity != per_axis(0, 2, 3) or p_scale is None:
        return None
    from qjax.kernels.attention import PV_FORMATS, p_scale as kernel_p_scale  # kernels sit below ops

    for pv, fmt in PV_FORMATS.items():
        if fmt is None:
            continue
        p_ok = plain(p_spec, fmt) if p_spec is not None else fmt == "int8"  # a bare p_scale means int8
        if plain(v_spec, fmt) and p_ok and abs(p_scale - 1 / kernel_p_scale(pv)) < 1e-12:
            return pv
    return None


def _flash_kernel_path(q, k, v, q_spec, k_spec, v_spec, pv, causal, scale, kv_lengths):
    from qjax.kernels.attention import int8_flash_attention  # kernels sit below ops

    qq, kq, vq = quantize(q, q_spec), quantize(k, k_spec), quantize(v, v_spec)
    to_bhtd = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731
    out = int8_flash_attention(
        to_bhtd(qq.values), to_bhtd(kq.values), to_bhtd(vq.values), qq.scale[..., 0].transpose(0, 2, 1),
        kq.scale[..., 0].transpose(0, 2, 1), vq.scale[:, 0], kv_lengths=kv_lengths, causal=causal, sm_scale=scale,
        pv=pv, out_dtype=jnp.float32,
    )  # fmt: skip
    return to_bhtd(out).astype(q.dtype)


def _combined_mask(mask, causal, b, h, t, s):
    keep = jnp.ones((1, 1, t, s), bool)
    if causal:
        keep = keep & causal_mask(t, s)[None, None]
    if mask is not None:
        keep = keep & jnp.broadcast_to(mask.astype(bool), (b, h, t, s))
    return jnp.broadcast_to(keep, (b, h, t, s))


def repeat_heads(x: QArray, groups: int, axis: int = 2) -> QArray:
    """Repeat a (B, S, Hkv, D) QArray's heads `groups` times (GQA), keeping its per-head/shared scales."""
    if groups == 1:
        return x
    tile = x.tiles[axis]
    if tile == 1:
        rep = lambda a: jnp.repeat(a, groups, axis=axis)  # noqa: E731
        tiles = x.tiles
    elif tile == x.shape[axis]:  # one scale across all heads: values repeat, the scale does not
        rep = None
        tiles = x.tiles[:axis] + (tile * groups,) + x.tiles[axis + 1 :]
    else:
        raise ValueError(f"GQA head repetition needs per-head or all-head scales along axis {axis}, got tile {tile}")
    values = jnp.repeat(x.values, groups, axis=axis)
    scale = x.scale if rep is None else rep(x.scale)
    zp = x.zero_point if (rep is None or x.zero_point is None) else rep(x.zero_point)
    shape = x.shape[:axis] + (x.shape[axis] * groups,) + x.shape[axis + 1 :]
    return QArray(values, scale, zp, x.format, shape, tiles, x.dtype)

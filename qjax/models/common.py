"""Pieces shared by qjax's Flax NNX model families: rotary embeddings, masks, generation."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from qjax.layers import AttentionOp, KVCache


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling`: "default", "linear" (factor) or "llama3" (factor, low/high freq factors, original length)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, d: dict | None) -> RopeScaling:
        if not d:
            return cls()
        kind = d.get("rope_type", d.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise NotImplementedError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(rope_type=kind, **{k: v for k, v in d.items() if k in fields and k != "rope_type"})


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> jnp.ndarray:
    """Inverse frequencies of rotary embeddings, with HF's linear / llama3 scaling rules."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    if scaling.rope_type == "llama3":
        low_wl = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wl = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wl = 2 * math.pi / inv
        scaled = jnp.where(wl > low_wl, inv / scaling.factor, inv)
        smooth = (scaling.original_max_position_embeddings / wl - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        mid = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        return jnp.where((wl >= high_wl) & (wl <= low_wl), mid, scaled)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate (B, T, H, D) by position (HF 'rotate_half' layout: first and second halves pair up)."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, D/2)
    cos, sin = jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class CausalSelfAttention(nnx.Module):
    """Multi-head / grouped-query causal self-attention with HF projection names and an optional KV cache."""

    def __init__(self, d: int, heads: int, kv_heads: int, head_dim: int, *, qkv_bias: bool, out_bias: bool,
                 out_name: str = "o_proj", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):  # fmt: skip
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        lin = lambda i, o, b: nnx.Linear(i, o, use_bias=b, dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # noqa: E731
        self.q_proj = lin(d, heads * head_dim, qkv_bias)
        self.k_proj = lin(d, kv_heads * head_dim, qkv_bias)
        self.v_proj = lin(d, kv_heads * head_dim, qkv_bias)
        self.out_name = out_name
        setattr(self, out_name, lin(heads * head_dim, d, out_bias))
        self.attn = AttentionOp()
        self.cache = nnx.data(None)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32, spec=None) -> None:
        self.cache = KVCache(batch, max_len, self.kv_heads, self.head_dim, dtype, spec)

    def __call__(self, x, positions, inv_freq=None, mask=None):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        if inv_freq is not None:
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if self.cache is not None:
            k, v, valid = self.cache.update(k, v)
            extra = valid[None, None, None, :]
            mask = extra if mask is None else mask & extra
            # causal: query i (absolute position start+i) sees keys <= start+i
            causal = jnp.arange(k.shape[1])[None, :] <= positions[:, :, None]
            mask = mask & causal[:, None, :, :]
            o = self.attn(q, k, v, mask=mask)
        else:
            o = self.attn(q, k, v, mask=mask, causal=True)
        return getattr(self, self.out_name)(o.reshape(b, t, self.heads * self.head_dim))


class KVCacheDecoder:
    """Mixin for decoders whose `layers` each hold a `CausalSelfAttention` as `self_attn`."""

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32, spec=None) -> None:
        """Give every layer a KV cache of `max_len` positions (quantized when `spec` is given)."""
        for layer in self.layers:
            layer.self_attn.init_cache(batch, max_len, dtype, spec)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.cache = None


def generate(model, ids: jax.Array, max_new_tokens: int, *, key: jax.Array | None = None, temperature: float = 0.0,
             kv_spec=None) -> jax.Array:  # fmt: skip
    """Greedy (temperature 0) or sampled continuation of `ids` (B, T) with a KV cache; returns (B, T + new)."""
    b, t = ids.shape
    model.init_cache(b, t + max_new_tokens, spec=kv_spec)
    logits = model(ids, positions=jnp.broadcast_to(jnp.arange(t), (b, t)))[:, -1]
    out = [ids]
    for i in range(max_new_tokens):
        if temperature > 0:
            if key is None:
                raise ValueError("sampling (temperature > 0) needs an explicit PRNG key")
            key, sub = jax.random.split(key)
            nxt = jax.random.categorical(sub, logits / temperature, axis=-1)
        else:
            nxt = jnp.argmax(logits, axis=-1)
        out.append(nxt[:, None])
        if i + 1 < max_new_tokens:
            pos = jnp.full((b, 1), t + i)
            logits = model(nxt[:, None], positions=pos)[:, -1]
    model.clear_cache()
    return jnp.concatenate(out, axis=1)

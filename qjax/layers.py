"""NNX building blocks that quantization rules can target: an attention op and a (quantizable) KV cache.

Models call `AttentionOp` for the core softmax(QKᵀ)V and keep keys/values in a `KVCache`; a rule with
`op="attention"` then sets the Q/K/V/P specs of the op and the storage format of the cache under the
same path, without touching the model's code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qjax.numerics import QArray, QuantSpec, quantize
from qjax.ops.attention import attention


class AttentionOp(nnx.Module):
    """softmax(q kᵀ/√d + mask) v on (B, T, H, D) / (B, S, Hkv, D) tensors, with optional operand quantization."""

    def __init__(self):
        self.q_spec = self.k_spec = self.v_spec = self.p_spec = None
        self.p_scale = None
        self.k_smooth = False
        self.mode = "fake"
        self.qk_transform = nnx.data(None)

    def set_qk_transform(self, m) -> None:
        """Apply an orthogonal map `m` (over head_dim) to q and k before they are quantized (QuaRot's online
        Hadamard after RoPE): (q H)(k H)ᵀ = q kᵀ, so attention is unchanged in float while the quantized
        q/k (and a quantized KV cache fed from them) see spread-out outliers."""
        from qjax.transforms.nnx_modules import OnlineTransform

        self.qk_transform = OnlineTransform(m)

    def configure(self, q=None, k=None, v=None, p=None, p_scale=None, k_smooth=False, mode="fake") -> None:
        """Set the operand specs (called by `qjax.quantize` for rules with op="attention")."""
        self.q_spec, self.k_spec, self.v_spec, self.p_spec = q, k, v, p
        self.p_scale, self.k_smooth, self.mode = p_scale, k_smooth, mode

    def __call__(self, q, k, v, *, mask=None, causal=False, scale=None):
        if self.qk_transform is not None:
            m = self.qk_transform.get_value()
            q, k = m.apply(q), m.apply(k)
        return attention(
            q, k, v, mask=mask, causal=causal, scale=scale, q_spec=self.q_spec, k_spec=self.k_spec,
            v_spec=self.v_spec, p_spec=self.p_spec, p_scale=self.p_scale, k_smooth=self.k_smooth, mode=self.mode,
        )  # fmt: skip


class KVCache(nnx.Module):
    """Keys and values of past tokens, (B, S_max, Hkv, D), stored in float or as QArrays.

    With a spec, each appended token is quantized on its own (the spec must keep the sequence axis at
    tile size 1: `per_axis(0, 1)` per token, `per_axis(0, 1, 2)` per token and head, or groups along D).
    """

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype=jnp.float32, spec: QuantSpec | None = None):
        self.shape = (batch, max_len, kv_heads, head_dim)
        self.dtype = dtype
        self.spec = spec
        self.length = nnx.Cache(jnp.zeros((), jnp.int32))
        self._allocate()

    def _allocate(self) -> None:
        zeros = jnp.zeros(self.shape, self.dtype)
        if self.spec is None:
            self.k, self.v = nnx.Cache(zeros), nnx.Cache(zeros)
            return
        if self.spec.granularity.tile_shape(self.shape)[1] != 1:
            raise ValueError(f"KV cache spec must quantize each token separately (tile 1 along the sequence axis), got {self.spec.granularity}")
        self.k, self.v = nnx.Cache(quantize(zeros, self.spec)), nnx.Cache(quantize(zeros, self.spec))

    def set_spec(self, spec: QuantSpec | None) -> None:
        """Change the storage format (clears the cache)."""
        self.spec = spec
        self.length.set_value(jnp.zeros((), jnp.int32))
        self._allocate()

    @property
    def nbytes(self) -> int:
        leaves = jax.tree.leaves((self.k.get_value(), self.v.get_value()))
        return sum(a.size * a.dtype.itemsize for a in leaves)

    def reset(self) -> None:
        self.length.set_value(jnp.zeros((), jnp.int32))

    def update(self, k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Append (B, T, Hkv, D) keys/values; returns all keys, values (float) and the valid-length mask (S_max,)."""
        start = self.length.get_value()
        self.k.set_value(_write(self.k.get_value(), k_new, start, self.spec))
        self.v.set_value(_write(self.v.get_value(), v_new, start, self.spec))
        self.length.set_value(start + k_new.shape[1])
        valid = jnp.arange(self.shape[1]) < self.length.get_value()
        return _read(self.k.get_value()), _read(self.v.get_value()), valid


def _write(store, new, start, spec):
    if spec is None:
        return jax.lax.dynamic_update_slice_in_dim(store, new.astype(store.dtype), start, axis=1)
    q = quantize(new, spec)
    upd = lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, start, axis=1)  # noqa: E731
    zp = None if store.zero_point is None else upd(store.zero_point, q.zero_point)
    return QArray(upd(store.values, q.values), upd(store.scale, q.scale), zp, store.format, store.shape, store.tiles, store.dtype)


def _read(store):
    return store.dequantize() if isinstance(store, QArray) else store

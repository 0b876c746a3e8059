"""Quantized attention op, GQA, masks, KV cache, and attention rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
import qjax.numerics as qn
from qjax.layers import AttentionOp, KVCache
from tests import np_reference as ref


def np_attention(q, k, v, causal, qf=lambda a: a, kf=lambda a: a, vf=lambda a: a, pf=lambda a: a, mask=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    q, k, v = qf(q), kf(k), vf(v)
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    t, sl = q.shape[1], k.shape[1]
    keep = np.ones((t, sl), bool)
    if causal:
        keep = np.arange(sl)[None] <= np.arange(t)[:, None] + (sl - t)
    keep = np.broadcast_to(keep, s.shape) if mask is None else keep & np.broadcast_to(mask, s.shape)
    s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    denom = p.sum(-1, keepdims=True)
    return (np.einsum("bhts,bshd->bhtd", pf(p), v) / denom).transpose(0, 2, 1, 3)


@pytest.fixture(scope="module")
def qkv():
    ks = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(ks[0], (2, 9, 4, 16)), jax.random.normal(ks[1], (2, 11, 2, 16)), jax.random.normal(ks[2], (2, 11, 2, 16)))


@pytest.mark.parametrize("causal", [False, True])
def test_float_attention_with_gqa_matches_numpy(qkv, causal):
    q, k, v = qkv
    np.testing.assert_allclose(np.asarray(qjax.ops.attention(q, k, v, causal=causal)), np_attention(q, k, v, causal), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["fake", "int"])
def test_int8_attention_matches_numpy_fake_quant_reference(qkv, mode):
    q, k, v = qkv
    tok = qn.QuantSpec("int8", qn.per_token())
    vch = qn.QuantSpec("int8", qn.per_axis(0, 2, 3))  # per (batch, head, channel): constant over the sequence
    out = qjax.ops.attention(q, k, v, causal=True, q_spec=tok, k_spec=tok, v_spec=vch, p_scale=1 / 127, mode=mode)
    p_q = lambda p: np.clip(np.round(p * 127), -128, 127) / 127  # noqa: E731
    expected = np_attention(q, k, v, True, lambda a: ref.per_token_int(a, 8), lambda a: ref.per_token_int(a, 8),
                            lambda a: ref.int_symmetric(a, 8, axis_keep=(0, 2, 3)), p_q)  # fmt: skip
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)
    assert np.abs(expected - np_attention(q, k, v, True)).max() > 1e-3  # quantization is visible


def test_k_smoothing_is_exact_in_float_and_helps_with_a_k_offset(qkv):
    q, k, v = qkv
    k_off = k + 20.0  # a large common offset in K: softmax-invariant, harmful for K's quantization
    np.testing.assert_allclose(np.asarray(qjax.ops.attention(q, k_off, v, k_smooth=True)),
                               np.asarray(qjax.ops.attention(q, k, v)), rtol=1e-4, atol=1e-4)  # fmt: skip
    tok = qn.QuantSpec("int4", qn.per_token())
    exact = np.asarray(qjax.ops.attention(q, k, v))
    plain = np.abs(np.asarray(qjax.ops.attention(q, k_off, v, q_spec=tok, k_spec=tok)) - exact).mean()
    smooth = np.abs(np.asarray(qjax.ops.attention(q, k_off, v, q_spec=tok, k_spec=tok, k_smooth=True)) - exact).mean()
    assert smooth < 0.5 * plain


def test_padding_mask_for_variable_lengths(qkv):
    q, k, v = qkv
    lengths = jnp.array([11, 6])
    mask = (jnp.arange(11)[None, :] < lengths[:, None])[:, None, None, :]
    out = qjax.ops.attention(q, k, v, mask=mask)
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(qjax.ops.attention(q[1:], k[1:, :6], v[1:, :6])[0]), rtol=1e-5, atol=1e-5)


def test_attention_shape_errors(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="multiple"):
        qjax.ops.attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="shapes"):
        qjax.ops.attention(q, k[..., :8], v)


@pytest.mark.parametrize("spec,bits", [(qn.QuantSpec("int8", qn.per_axis(0, 1, 2)), 8), (qn.QuantSpec("int4", qn.per_axis(0, 1, 2)), 4)])
def test_quantized_kv_cache_stores_each_token_and_shrinks(spec, bits):
    cache = KVCache(2, 16, 2, 32, spec=spec)
    float_cache = KVCache(2, 16, 2, 32)
    ks = [jax.random.normal(jax.random.key(i), (2, n, 2, 32)) for i, n in enumerate((5, 1, 3))]
    for kn in ks:
        kk, vv, valid = cache.update(kn, -kn)
        float_cache.update(kn, -kn)
    allk = np.concatenate([np.asarray(a) for a in ks], axis=1)
    np.testing.assert_allclose(np.asarray(kk[:, :9]), ref.int_symmetric(allk, bits, axis_keep=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    assert np.asarray(valid).sum() == 9
    assert cache.nbytes < float_cache.nbytes * (bits / 32 + 0.1)
    with pytest.raises(ValueError, match="sequence axis"):
        KVCache(2, 16, 2, 32, spec=qn.QuantSpec("int8", qn.per_axis(2)))


class TinyAttention(nnx.Module):
    def __init__(self, rngs):
        self.qkv = nnx.Linear(32, 3 * 32, rngs=rngs)
        self.attn = AttentionOp()
        self.cache = KVCache(1, 8, 4, 8)

    def __call__(self, x):
        b, t, _ = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, t, 12, 8), 3, axis=2)
        kk, vv, valid = self.cache.update(k, v)
        return self.attn(q, kk, vv, mask=valid[None, None, None, :], causal=True)


def test_attention_rule_configures_op_and_cache():
    m = TinyAttention(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 8, 32))
    tok = qn.QuantSpec("int8", qn.per_token())
    kv = qn.QuantSpec("int4", qn.per_axis(0, 1, 2))
    qm = qjax.quantize(m, [qjax.Rule("attn|cache", op="attention", q=tok, k=tok, kv=kv)], "serve")
    assert qm.attn.q_spec == tok and qm.attn.mode == "int" and qm.cache.spec == kv
    assert m.attn.q_spec is None and m.cache.spec is None  # the original is untouched
    y = qm(x)
    q, k, v = jnp.split(m.qkv(x).reshape(1, 8, 12, 8), 3, axis=2)
    kq, vq = qn.quantize_dequantize(k, kv), qn.quantize_dequantize(v, kv)
    expected = qjax.ops.attention(q, kq, vq, causal=True, q_spec=tok, k_spec=tok)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-4, atol=1e-4)

"""Pallas kernels (interpret mode on CPU, native on GPU): exact int32 accumulation and float64 references."""

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from qjax.kernels.attention import int8_flash_attention, quantize_qkv
from qjax.kernels.gemm import pack_int4_kernel_layout, w8a8_matmul, weight_only_matmul

RNG = np.random.default_rng(1234)


def _int8(shape):
    return jnp.asarray(RNG.integers(-128, 128, shape), jnp.int8)


@pytest.mark.parametrize("m,n,k,blocks", [(37, 50, 200, (16, 32, 64)), (16, 16, 16, None), (129, 33, 70, (32, 16, 32))])
def test_w8a8_int32_accumulation_is_bit_exact(m, n, k, blocks):
    a, w = _int8((m, k)), _int8((n, k))
    raw = w8a8_matmul(a, jnp.ones(m), w, jnp.ones(n), raw_int32=True, poison=True, blocks=blocks)
    np.testing.assert_array_equal(np.asarray(raw), np.asarray(a, np.int64) @ np.asarray(w, np.int64).T)


@pytest.mark.parametrize("group", [None, 32])
def test_w8a8_fused_epilogue_matches_float64(group):
    m, n, k = 45, 70, 160
    a, w = _int8((m, k)), _int8((n, k))
    sa = RNG.uniform(0.001, 0.1, m).astype(np.float32)
    sw = RNG.uniform(0.001, 0.1, (n,) if group is None else (n, k // group)).astype(np.float32)
    bias = RNG.standard_normal(n).astype(np.float32)
    y = w8a8_matmul(a, jnp.asarray(sa), w, jnp.asarray(sw), jnp.asarray(bias), out_dtype=jnp.float32, group_size=group, poison=True)
    wd = np.asarray(w, np.float64) * (sw[:, None] if group is None else np.repeat(sw, group, axis=1))
    ref = (np.asarray(a, np.float64) @ wd.T) * sa[:, None] + bias
    assert not np.isnan(np.asarray(y)).any()
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())
    y16 = w8a8_matmul(a, jnp.asarray(sa), w, jnp.asarray(sw), jnp.asarray(bias), out_dtype=jnp.bfloat16, group_size=group)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float64), ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


@pytest.mark.parametrize("bits,group", [(8, 32), (8, 128), (4, 64), (4, 128)])
def test_weight_only_gemm_matches_float64(bits, group):
    m, n, k = 19, 48, 256
    x = jnp.asarray(RNG.standard_normal((m, k)), jnp.float32)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    codes = jnp.asarray(RNG.integers(lo, hi, (n, k)), jnp.int8)
    scales = RNG.uniform(0.001, 0.1, (n, k // group)).astype(np.float32)
    w = pack_int4_kernel_layout(codes, 128) if bits == 4 else codes
    y = weight_only_matmul(x, w, jnp.asarray(scales), bits=bits, group_size=group, block_k=max(128, group), poison=True)
    wd = np.asarray(codes, np.float64) * np.repeat(scales, group, axis=1)
    ref = np.asarray(x, np.float64) @ wd.T
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


def test_gemm_errors():
    with pytest.raises(ValueError, match="K-major"):
        w8a8_matmul(_int8((4, 32)), jnp.ones(4), _int8((32, 16)), jnp.ones(32))
    with pytest.raises(TypeError, match="int8"):
        w8a8_matmul(jnp.ones((4, 32)), jnp.ones(4), _int8((8, 32)), jnp.ones(8))
    with pytest.raises(ValueError, match="group_size"):
        weight_only_matmul(jnp.ones((4, 32)), _int8((8, 32)), jnp.ones((8, 1)), group_size=0)


# ---- attention -------------------------------------------------------------------------------------------


def _qkv(b, h, hkv, t, s, d, seed=0):
    """Inputs from their own generator, so that a test's data never depends on which tests ran before."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, h, t, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, hkv, s, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, hkv, s, d)), jnp.float32)
    return q, k, v


def _mask(t, s, causal, lengths, b):
    keep = np.ones((b, 1, t, s), bool)
    if causal:
        keep &= (np.arange(s)[None] <= np.arange(t)[:, None] + (s - t))[None, None]
    if lengths is not None:
        keep &= (np.arange(s)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]
    return keep


def _reference(q8, k8, v, qs, ks, vs, causal, lengths, quantize_p=None):
    """float64 attention of the dequantized operands; with quantize_p ("int8" or "fp8"), P is rounded as
    the kernel rounds it — round(127·p) or e4m3(448·p) — with the global row max (what the kernel does
    when all keys fit in one block), while the row sum keeps the unquantized p."""
    b, h, t, d = q8.shape
    g = h // k8.shape[1]
    q = np.asarray(q8, np.float64) * np.asarray(qs)[..., None]
    k = np.repeat(np.asarray(k8, np.float64) * np.asarray(ks)[..., None], g, 1)
    vv = np.asarray(v, np.float64) if vs is None else np.asarray(v, np.float64) * np.asarray(vs)[:, :, None, :]
    vv = np.repeat(vv, g, 1)
    s = np.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(d)
    keep = np.broadcast_to(_mask(t, k.shape[2], causal, lengths, b), s.shape)
    s = np.where(keep, s, -np.inf)
    p = np.where(keep, np.exp(s - s.max(-1, keepdims=True)), 0)
    denom = p.sum(-1, keepdims=True)
    if quantize_p == "int8":
        p = np.floor(p * 127 + 0.5) / 127
    elif quantize_p == "fp8":
        p = (p * 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) / 448
    return np.einsum("bhts,bhsd->bhtd", p, vv) / denom


@pytest.mark.parametrize("pv", ["int8", "fp8"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_int8_attention_single_block_equals_fake_quant_reference(pv, d, causal):
    q, k, v = _qkv(1, 4, 2, 19, 29, d, seed=d + causal)
    q8, k8, v8, qs, ks, vs = quantize_qkv(q, k, v, pv=pv, k_smooth=False)
    out = int8_flash_attention(q8, k8, v8, qs, ks, vs, causal=causal, pv=pv, blocks=(32, 32), out_dtype=jnp.float32, poison=True)
    ref = _reference(q8, k8, v8, qs, ks, vs, causal, None, quantize_p=pv)
    out = np.asarray(out)
    assert not np.isnan(out).any()
    # exp2 in float32 vs exp in float64 can move one P value across a boundary of its grid (one level:
    # 1/127, or one e4m3 step ≤ p/16), rarely; everything else agrees to float32 rounding
    diff = np.abs(out - ref)
    v_max = np.abs(np.asarray(v8, np.float64) * np.asarray(vs)[:, :, None]).max()
    assert np.mean(diff < 1e-4) > 0.99 and diff.max() < (1.5 / 127 if pv == "int8" else 1 / 15) * v_max


@pytest.mark.parametrize("pv", ["int8", "fp8", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
def test_int8_attention_multi_block_with_gqa_and_lengths(pv, causal):
    b, h, hkv, t, s, d = 2, 4, 1, 33, 47, 64
    q, k, v = _qkv(b, h, hkv, t, s, d)
    lengths = jnp.array([47, 30])
    q8, k8, v8, qs, ks, vs = quantize_qkv(q, k, v, pv=pv, k_smooth=False)
    out = int8_flash_attention(q8, k8, v8, qs, ks, vs, kv_lengths=lengths, causal=causal, pv=pv, blocks=(16, 16),
                               out_dtype=jnp.float32, poison=True)  # fmt: skip
    out = np.asarray(out)
    assert not np.isnan(out).any()
    # vs the dequantized-operand reference without P quantization: only P rounding (and bf16 V) remains
    ref = _reference(q8, k8, v8, qs, ks, vs, causal, lengths)
    mre = np.mean(np.abs(out - ref)) / np.mean(np.abs(ref))
    assert mre < {"int8": 0.03, "fp8": 0.05, "bf16": 0.01}[pv], mre
    # vs exact float attention: INT-FlashAttention-level error
    exact = _reference(q, k, v, jnp.ones((b, h, t)), jnp.ones((b, hkv, s)), None, causal, lengths)
    assert np.mean(np.abs(out - exact)) / np.mean(np.abs(exact)) < (0.05 if pv != "fp8" else 0.07)


def test_per_block_qk_scales_are_block_absmax_and_track_per_token_accuracy():
    q, k, v = _qkv(1, 2, 2, 40, 40, 64, seed=3)
    q8, k8, _, qs, ks, _ = quantize_qkv(q, k, v, k_smooth=False, block=16)
    qn = np.asarray(q, np.float64)
    for start in range(0, 40, 16):  # one scale per 16 tokens: the block's absmax / 127, repeated per token
        want = np.abs(qn[:, :, start : start + 16]).max(axis=(2, 3)) / 127
        np.testing.assert_allclose(np.asarray(qs)[:, :, start : start + 16], np.repeat(want[..., None], min(16, 40 - start), 2), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q8), np.clip(np.round(qn / np.asarray(qs)[..., None]), -127, 127))
    exact = _reference(q, k, v, jnp.ones((1, 2, 40)), jnp.ones((1, 2, 40)), None, False, None)
    errs = {}
    for block in (None, 16):
        args = quantize_qkv(q, k, v, k_smooth=False, block=block)
        out = np.asarray(int8_flash_attention(*args, blocks=(16, 16), out_dtype=jnp.float32))
        errs[block] = np.mean(np.abs(out - exact)) / np.mean(np.abs(exact))
    assert errs[None] <= errs[16] < 0.05, errs  # coarser scales cost a little accuracy, never a lot


def test_k_smoothing_reduces_error_when_k_has_an_offset():
    q, k, v = _qkv(1, 2, 2, 16, 32, 64)
    k = k + 8.0 * jnp.asarray(RNG.standard_normal((1, 2, 1, 64)), jnp.float32)  # a per-channel bias shared by all tokens
    exact = _reference(q, k, v, jnp.ones((1, 2, 16)), jnp.ones((1, 2, 32)), None, False, None)
    errs = {}
    for smooth in (False, True):
        q8, k8, v8, qs, ks, vs = quantize_qkv(q, k, v, k_smooth=smooth)
        out = np.asarray(int8_flash_attention(q8, k8, v8, qs, ks, vs, out_dtype=jnp.float32))
        errs[smooth] = np.mean(np.abs(out - exact))
    assert errs[True] < 0.5 * errs[False], errs


def test_attention_errors():
    q, k, v = _qkv(1, 3, 2, 8, 8, 64)
    q8, k8, v8, qs, ks, vs = quantize_qkv(q, k, v)
    with pytest.raises(ValueError, match="multiple"):
        int8_flash_attention(q8, k8, v8, qs, ks, vs)
    with pytest.raises(TypeError, match="int8"):
        int8_flash_attention(q, k8, v8, qs, ks, vs)


@pytest.mark.gpu
def test_kernels_lower_natively_on_gpu():
    """Every kernel variant compiled for the GPU (not interpreted) against the same references."""
    assert jax.devices()[0].platform == "gpu"
    a, w = _int8((256, 512)), _int8((192, 512))
    raw = w8a8_matmul(a, jnp.ones(256), w, jnp.ones(192), raw_int32=True, interpret=False, poison=True)
    np.testing.assert_array_equal(np.asarray(raw), np.asarray(a, np.int64) @ np.asarray(w, np.int64).T)
    x = jnp.asarray(RNG.standard_normal((24, 512)), jnp.bfloat16)
    codes = jnp.asarray(RNG.integers(-8, 8, (192, 512)), jnp.int8)
    scales = jnp.asarray(RNG.uniform(0.01, 0.1, (192, 4)), jnp.float32)
    ref = np.asarray(x, np.float64) @ (np.asarray(codes, np.float64) * np.repeat(np.asarray(scales), 128, 1)).T
    for bits, wq in ((8, codes), (4, pack_int4_kernel_layout(codes, 128))):
        y = weight_only_matmul(x, wq, scales, bits=bits, group_size=128, interpret=False, poison=True)
        np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
    q, k, v = _qkv(2, 8, 2, 300, 300, 128)
    exact = _reference(q, k, v, jnp.ones((2, 8, 300)), jnp.ones((2, 2, 300)), None, True, None)
    for pv in ("int8", "fp8", "bf16"):
        out = int8_flash_attention(*quantize_qkv(q, k, v, pv=pv), causal=True, pv=pv, interpret=False, out_dtype=jnp.float32, poison=True)
        out = np.asarray(out)
        assert np.isfinite(out).all()
        assert np.mean(np.abs(out - exact)) / np.mean(np.abs(exact)) < 0.07, pv


# ---- dispatch from qjax.ops (forced on CPU: the kernels run in interpret mode) ------------------------


@pytest.mark.parametrize("rhs_gran", ["channel", "group"])
def test_ops_dot_general_dispatches_w8a8_to_the_kernel(rhs_gran):
    import qjax.numerics as qn
    import qjax.ops as qo

    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((2, 7, 96)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((96, 40)), jnp.float32)
    ls = qn.QuantSpec("int8", qn.per_token())
    rs = qn.QuantSpec("int8", qn.per_axis(1) if rhs_gran == "channel" else qn.per_group(0, 32))
    dn = (((2,), (0,)), ((), ()))
    via_kernel = qo.dot_general(x, w, dn, lhs_spec=ls, rhs_spec=rs, mode="int", use_kernels=True)
    via_xla = qo.dot_general(x, w, dn, lhs_spec=ls, rhs_spec=rs, mode="int", use_kernels=False)
    np.testing.assert_allclose(np.asarray(via_kernel), np.asarray(via_xla), rtol=1e-5, atol=1e-5)
    jaxpr = lambda flag: str(jax.make_jaxpr(lambda x, w: qo.dot_general(x, w, dn, lhs_spec=ls, rhs_spec=rs, mode="int", use_kernels=flag))(x, w))  # noqa: E731
    assert "pallas_call" in jaxpr(True) and "pallas_call" not in jaxpr(False)


@pytest.mark.parametrize("pv", ["int8", "fp8"])
@pytest.mark.parametrize("causal", [False, True])
def test_ops_attention_dispatches_int_flash_config_to_the_kernel(pv, causal):
    import qjax.numerics as qn
    import qjax.ops as qo

    rng = np.random.default_rng(7)  # own generator: inputs must not depend on test order
    q = jnp.asarray(rng.standard_normal((2, 13, 4, 64)), jnp.float32)  # (B, T, H, D)
    k = jnp.asarray(rng.standard_normal((2, 29, 2, 64)), jnp.float32)  # GQA: 2 KV heads; S fits one key block
    v = jnp.asarray(rng.standard_normal((2, 29, 2, 64)), jnp.float32)
    tok = qn.QuantSpec("int8", qn.per_token())
    fmt, p_scale = ("int8", 1 / 127) if pv == "int8" else ("fp8_e4m3", 1 / 448)
    vch = qn.QuantSpec(fmt, qn.per_axis(0, 2, 3))
    lengths = jnp.array([29, 17])
    kw = dict(causal=causal, q_spec=tok, k_spec=tok, v_spec=vch, p_spec=qn.QuantSpec(fmt), p_scale=p_scale, mode="int",
              kv_lengths=lengths)  # fmt: skip
    via_kernel = qo.attention(q, k, v, use_kernels=True, **kw)
    via_xla = qo.attention(q, k, v, use_kernels=False, **kw)
    diff = np.abs(np.asarray(via_kernel) - np.asarray(via_xla))
    # The kernel's exp2 with folded constants and XLA's exp differ in the last bits, which can move a
    # P value across a rounding boundary of its grid: one level on one element, never more.
    step = 1 / 127 if pv == "int8" else 1 / 16
    assert diff.mean() < 1e-4 and diff.max() < 1.5 * float(jnp.abs(v).max()) * step
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: qo.attention(q, k, v, use_kernels=True, **kw))(q, k, v))
    assert "pallas_call" in jaxpr


def test_autotuner_never_times_on_cpu_or_under_a_trace():
    from qjax.kernels.common import Autotuner, KernelConfig

    calls = []
    tuner = Autotuner()
    cands = [KernelConfig((16, 16)), KernelConfig((32, 32))]
    run = lambda cfg: calls.append(cfg) or jnp.zeros(())  # noqa: E731
    assert tuner.pick("k", cands, run, traced=True) == cands[0] and tuner.cache == {}
    assert tuner.pick("k", cands, run) == cands[0]  # on CPU: the first candidate, nothing timed or cached
    assert calls == [] and tuner.cache == {}
    jitted = jax.jit(lambda a, w: w8a8_matmul(a, jnp.ones(16), w, jnp.ones(16), raw_int32=True))
    a, w = _int8((16, 32)), _int8((16, 32))
    np.testing.assert_array_equal(np.asarray(jitted(a, w)), np.asarray(a, np.int64) @ np.asarray(w, np.int64).T)


def test_autotuner_keeps_the_fastest_and_persists_it(tmp_path, monkeypatch):
    import time

    import qjax.kernels.common as kc

    monkeypatch.setattr(kc, "on_gpu", lambda: True)  # time candidates as on a GPU
    delays = {(16, 16): 0.004, (32, 32): 0.0, (64, 64): 0.002}
    failing = kc.KernelConfig((128, 128))

    def run(cfg):
        if cfg == failing:
            raise RuntimeError("too much shared memory")  # rejected configurations are skipped
        time.sleep(delays[cfg.blocks])
        return jnp.zeros(())

    cands = [kc.KernelConfig(b) for b in delays] + [failing]
    path = tmp_path / "tune.json"
    best = kc.Autotuner(path=str(path), repeats=2).pick(("gemm", 64), cands, run)
    assert best.blocks == (32, 32)
    calls = []
    again = kc.Autotuner(path=str(path)).pick(("gemm", 64), cands, lambda c: calls.append(c))
    assert again == best and calls == []  # a new process reads the choice instead of re-timing
    path.write_text("{not json")  # a corrupt cache costs re-tuning, never a crash
    assert kc.Autotuner(path=str(path), repeats=1).pick(("gemm", 64), cands, run).blocks == (32, 32)
    with pytest.raises(RuntimeError, match="every candidate"):
        kc.Autotuner().pick("x", [failing, kc.KernelConfig((256, 256))], lambda c: run(failing))


def test_triton_w8a8_kernel_in_the_triton_interpreter(tmp_path):
    """The hand-written Triton GEMM (jax-triton backend on GPU), run by Triton's CPU interpreter: int32
    sums bit-exact and the fused epilogue against float64, on odd sizes that exercise every edge mask
    and the grouped program order (more row blocks than GROUP_M)."""
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    import subprocess
    import sys

    rng = np.random.default_rng(11)
    cases, refs = {}, {}
    for name, (m, n, k, blocks, raw) in {
        "exact_odd": (37, 50, 200, (16, 32, 64), True),
        "exact_many_row_blocks": (150, 20, 48, (16, 16, 32), True),
        "epilogue": (45, 70, 160, (32, 64, 32), False),
    }.items():
        a = rng.integers(-128, 128, (m, k)).astype(np.int8)
        w = rng.integers(-128, 128, (n, k)).astype(np.int8)
        sa, sw = rng.uniform(0.001, 0.1, m).astype(np.float32), rng.uniform(0.001, 0.1, n).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        cases.update({f"{name}/a": a, f"{name}/w": w, f"{name}/sa": sa, f"{name}/sw": sw, f"{name}/bias": bias,
                      f"{name}/blocks": np.array(blocks), f"{name}/raw": np.array(raw)})  # fmt: skip
        exact = a.astype(np.int64) @ w.astype(np.int64).T
        refs[name] = exact if raw else exact * sa[:, None].astype(np.float64) * sw[None, :] + bias
    np.savez(tmp_path / "cases.npz", **cases)
    script = os.path.join(os.path.dirname(__file__), "triton_interpreter_run.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, script, str(tmp_path / "cases.npz"), str(tmp_path / "out.npz")], env=env, check=True, timeout=300)
    outs = np.load(tmp_path / "out.npz")
    for name, ref in refs.items():
        if ref.dtype == np.int64:
            np.testing.assert_array_equal(outs[name], ref, err_msg=name)
        else:
            assert not np.isnan(outs[name]).any()
            np.testing.assert_allclose(outs[name], ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max(), err_msg=name)


def _lowers_to_triton(fn, *avals) -> str:
    """Lower `fn` for CUDA on this (CPU) machine: Pallas builds the Triton IR here, so an unsupported op or
    a non-power-of-two tile fails now, not on the GPU. Returns the StableHLO text."""
    return jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


_S = jax.ShapeDtypeStruct


@pytest.mark.parametrize(
    "name",
    ["w8a8", "w8a8_odd", "w8a8_grouped", "w8a16", "w4a16", "attn_int8_causal", "attn_fp8", "attn_bf16_gqa_d128"],
)
def test_every_kernel_lowers_to_triton_for_cuda(name):
    i8, f32, bf = jnp.int8, jnp.float32, jnp.bfloat16
    cases = {
        "w8a8": (lambda a, sa, w, sw: w8a8_matmul(a, sa, w, sw, interpret=False), _S((256, 512), i8), _S((256,), f32), _S((128, 512), i8), _S((128,), f32)),
        "w8a8_odd": (lambda a, sa, w, sw: w8a8_matmul(a, sa, w, sw, interpret=False), _S((37, 200), i8), _S((37,), f32), _S((50, 200), i8), _S((50,), f32)),
        "w8a8_grouped": (lambda a, sa, w, sw: w8a8_matmul(a, sa, w, sw, group_size=64, interpret=False), _S((64, 256), i8), _S((64,), f32), _S((64, 256), i8), _S((64, 4), f32)),
        "w8a16": (lambda x, w, s: weight_only_matmul(x, w, s, bits=8, group_size=32, interpret=False), _S((8, 512), bf), _S((256, 512), i8), _S((256, 16), f32)),
        "w4a16": (lambda x, w, s: weight_only_matmul(x, w, s, bits=4, group_size=64, interpret=False), _S((8, 512), bf), _S((256, 256), jnp.uint8), _S((256, 8), f32)),
    }  # fmt: skip
    for pv, causal, hkv, d in (("int8", True, 8, 64), ("fp8", False, 2, 64), ("bf16", False, 2, 128)):
        v_dt = {"int8": i8, "fp8": jnp.float8_e4m3fn, "bf16": bf}[pv]
        fn = functools.partial(lambda pv, causal, *a: int8_flash_attention(*a, causal=causal, pv=pv, interpret=False), pv, causal)
        key = f"attn_{pv}" + ("_causal" if causal else "") + ("_gqa_d128" if d == 128 else "")
        cases[key] = (fn, _S((2, 8, 200, d), i8), _S((2, hkv, 300, d), i8), _S((2, hkv, 300, d), v_dt), _S((2, 8, 200), f32), _S((2, hkv, 300), f32), _S((2, hkv, d), f32))
    fn, *avals = cases[name]
    hlo = _lowers_to_triton(fn, *avals)
    assert "__gpu$xla.gpu.triton" in hlo  # the Triton backend, not Mosaic GPU (jax's default since 0.9)


def test_kernel_benchmark_smoke_run_checks_every_variant(capsys):
    """The benchmark script itself (tiny sizes, interpret mode): every qjax variant runs and is accurate."""
    from benchmarks.bench_kernels import main

    text = main(["--smoke", "--gemm-sizes", "32", "--seqs", "32"])
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| qjax")]
    names = {r[0].strip() for r in rows}
    assert {"qjax W8A8, autotuned (bf16 out)", "qjax W4A16 g32, autotuned"} <= names
    assert {f"qjax INT8 QK + {pv} PV, autotuned" for pv in ("int8", "fp8", "bf16")} <= names
    for r in rows:
        assert r[2].strip() != "n/a", r
        assert float(r[6]) > 0.99, r  # cosine similarity against the float64 reference


@pytest.mark.parametrize("bits,gran", [(8, "channel"), (4, "group"), (8, "group")])
def test_ops_dot_general_dispatches_weight_only_to_the_kernel(bits, gran):
    import qjax.numerics as qn
    import qjax.ops as qo

    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((3, 5, 192)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((192, 40)), jnp.float32)
    spec = qn.QuantSpec(f"int{bits}", qn.per_axis(1) if gran == "channel" else qn.per_group(0, 64))
    wq = qn.quantize(w, spec)
    dn = (((2,), (0,)), ((), ()))
    via_kernel = qo.dot_general(x, wq, dn, mode="int", use_kernels=True)
    via_xla = qo.dot_general(x, wq, dn, mode="int", use_kernels=False)
    ref = np.einsum("btk,kn->btn", np.asarray(x, np.float64), np.asarray(wq.dequantize(), np.float64))
    np.testing.assert_allclose(np.asarray(via_kernel), ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(via_kernel), np.asarray(via_xla), rtol=1e-5, atol=1e-4 * np.abs(ref).max())
    jaxpr = str(jax.make_jaxpr(lambda x: qo.dot_general(x, wq, dn, mode="int", use_kernels=True))(x))
    assert "pallas_call" in jaxpr

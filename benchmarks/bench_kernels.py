"""Build, check and time qjax's Pallas kernels against XLA/cuDNN baselines; prints markdown tables.

GPU:  python -m benchmarks.bench_kernels --out benchmarks/results/kernels_h100.md
CPU:  python -m benchmarks.bench_kernels --smoke   (tiny sizes in interpret mode: checks, no meaningful times)
Timing: median of repeated runs after warm-up, inputs rotated among several sets so that caches do
not flatter; accuracy vs float32/float64 references (relative L2, cosine, mean relative error).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from qjax.kernels.attention import int8_flash_attention, quantize_qkv
from qjax.kernels.gemm import pack_int4_kernel_layout, w8a8_matmul, weight_only_matmul

from benchmarks.common import emit, environment, markdown_table, time_fn


def accuracy(out, ref) -> tuple[float, float, float]:
    o, r = np.asarray(out, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    rel_l2 = np.linalg.norm(o - r) / np.linalg.norm(r)
    cos = o @ r / (np.linalg.norm(o) * np.linalg.norm(r))
    mre = np.mean(np.abs(o - r)) / (np.mean(np.abs(r)) + 1e-5)
    return float(rel_l2), float(cos), float(mre)


def rotating(fn, sets):
    """A callable that cycles through input sets on every call (defeats cache reuse across repeats)."""
    state = {"i": 0}

    def call():
        args = sets[state["i"] % len(sets)]
        state["i"] += 1
        return fn(*args)

    return call


def bench_gemm(sizes, n_sets=3):
    rows = []
    for n in sizes:
        key = jax.random.key(n)
        sets = []
        for i in range(n_sets):
            ka, kw = jax.random.split(jax.random.fold_in(key, i))
            a = jax.random.normal(ka, (n, n), jnp.float32)
            w = jax.random.normal(kw, (n, n), jnp.float32)
            sa, sw = jnp.max(jnp.abs(a), 1) / 127, jnp.max(jnp.abs(w), 1) / 127
            a8 = jnp.round(a / sa[:, None]).astype(jnp.int8)
            w8 = jnp.round(w / sw[:, None]).astype(jnp.int8)  # (N, K): K-major
            sets.append((a, w, a8, w8, sa, sw))
        flops = 2 * n**3
        a, w, a8, w8, sa, sw = sets[0]
        ref = (np.asarray(a8, np.float64) * np.asarray(sa)[:, None]) @ (np.asarray(w8, np.float64) * np.asarray(sw)[:, None]).T
        ref_float = np.asarray(a, np.float64) @ np.asarray(w, np.float64).T
        scale_outer = np.outer(np.asarray(sa), np.asarray(sw))
        # name: (fn, argument picker, output → float result, reference)
        cases = {
            "XLA bf16 dot": (jax.jit(lambda a, w: jnp.dot(a, w.T)), lambda s: (s[0].astype(jnp.bfloat16), s[1].astype(jnp.bfloat16)),
                             lambda o: np.asarray(o, np.float64), ref_float),
            "XLA int8 dot_general→int32": (
                jax.jit(lambda a, w: jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)),
                lambda s: (s[2], s[3]), lambda o: np.asarray(o, np.float64) * scale_outer, ref,
            ),
            "qjax W8A8 Pallas (bf16 out)": (
                jax.jit(lambda a, sa, w, sw: w8a8_matmul(a, sa, w, sw, out_dtype=jnp.bfloat16)),
                lambda s: (s[2], s[4], s[3], s[5]), lambda o: np.asarray(o, np.float64), ref,
            ),
        }  # fmt: skip
        base = None
        for name, (fn, pick, post, reference) in cases.items():
            args = [pick(s) for s in sets]
            out = post(fn(*args[0]))
            t = time_fn(rotating(fn, args))
            base = base or t
            rows.append([name, f"{n}³", t * 1e3, flops / t / 1e12, base / t, *accuracy(out, reference)])
        # weight-only int4 (group 128)
        g = 128
        codes = jnp.clip(jnp.round(w / (jnp.max(jnp.abs(w)) / 7)), -8, 7).astype(jnp.int8)
        scales = jnp.full((n, n // g), jnp.max(jnp.abs(w)) / 7, jnp.float32)
        packed = pack_int4_kernel_layout(codes, 128)
        fn = jax.jit(lambda x, p, s: weight_only_matmul(x, p, s, bits=4, group_size=g))
        xb = a.astype(jnp.bfloat16)
        t = time_fn(lambda: fn(xb, packed, scales))
        ref4 = np.asarray(xb, np.float64) @ (np.asarray(codes, np.float64) * float(scales[0, 0])).T
        rows.append(["qjax W4A16 Pallas (g128)", f"{n}³", t * 1e3, flops / t / 1e12, base / t, *accuracy(fn(xb, packed, scales), ref4)])
    return rows


def bench_attention(seqs, batch=4, heads=32, d=128, causal=False):
    rows = []
    try:
        from jax.experimental.pallas.ops.gpu import attention as pallas_mha
    except Exception:  # not every jax build ships it
        pallas_mha = None
    for s in seqs:
        key = jax.random.key(s)
        q, k, v = (jax.random.normal(kk, (batch, heads, s, d), jnp.float32) for kk in jax.random.split(key, 3))
        flops = 4 * batch * heads * s * s * d // (2 if causal else 1)
        ref = jax.nn.dot_product_attention(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)), is_causal=causal).transpose(0, 2, 1, 3)
        cases = {}
        qb, kb, vb = (x.astype(jnp.bfloat16).transpose(0, 2, 1, 3) for x in (q, k, v))
        impl = "cudnn" if jax.default_backend() == "gpu" else None
        cases["jax.nn.dot_product_attention bf16"] = (jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl).transpose(0, 2, 1, 3)), (qb, kb, vb))
        if pallas_mha is not None and jax.default_backend() == "gpu":
            cases["Pallas flash attention bf16"] = (jax.jit(lambda q, k, v: pallas_mha.mha(q, k, v, segment_ids=None, causal=causal).transpose(0, 2, 1, 3)), (qb, kb, vb))
        for pv in ("int8", "bf16"):
            qa = quantize_qkv(q, k, v, pv=pv)
            cases[f"qjax INT8 QK + {pv} PV"] = (jax.jit(lambda *a, pv=pv: int8_flash_attention(*a, causal=causal, pv=pv, block_q=128, block_k=64)), qa)
        base = None
        for name, (fn, args) in cases.items():
            try:
                out = fn(*args)
                t = time_fn(fn, *args)
            except Exception as e:  # a baseline missing on this backend
                rows.append([name, s, "n/a", str(e)[:40], "", "", "", ""])
                continue
            base = base or t
            rows.append([name, s, t * 1e3, flops / t / 1e12, base / t, *accuracy(out.astype(jnp.float32), ref)])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, interpret mode on CPU")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    gemm_sizes = [128, 256] if args.smoke else [1024, 2048, 4096, 8192, 16384]
    seqs = [64, 128] if args.smoke else [1024, 2048, 4096, 8192, 16384]
    attn_kw = dict(batch=1, heads=2, d=64) if args.smoke else dict(batch=4, heads=32, d=128)
    text = "\n\n".join([
        f"# qjax kernel benchmark\n\n{environment()}",
        "## GEMM (M=N=K)\n\n" + markdown_table(["kernel", "size", "ms", "TOPS/TFLOPS", "× first row", "rel L2", "cosine", "MRE"], bench_gemm(gemm_sizes)),
        "## Attention (non-causal, forward)\n\n" + markdown_table(["kernel", "seq", "ms", "TFLOPS", "× first row", "rel L2", "cosine", "MRE"], bench_attention(seqs, **attn_kw)),
    ])  # fmt: skip
    return emit(text, args.out)


if __name__ == "__main__":
    main()

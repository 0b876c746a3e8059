"""Build, check and time qjax's kernels against XLA/cuDNN/Pallas baselines; prints markdown tables.

GPU:  python -m benchmarks.bench_kernels --out benchmarks/results/kernels_h100.md
CPU:  python -m benchmarks.bench_kernels --smoke   (tiny sizes in interpret mode: checks, no meaningful times)
Timing: median of many runs after warm-up (device time from CUPTI on GPU), inputs rotated among
several sets; accuracy vs float64 references (relative L2, cosine, mean relative error).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from qjax.kernels.attention import int8_flash_attention, quantize_qkv
from qjax.kernels.common import DEFAULT_TUNER, KernelConfig, jax_triton_available
from qjax.kernels.gemm import pack_int4_kernel_layout, w8a8_matmul, weight_only_matmul

from benchmarks.common import device_time, emit, environment, markdown_table


def accuracy(out, ref) -> tuple[float, float, float]:
    o, r = np.asarray(out, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    rel_l2 = np.linalg.norm(o - r) / np.linalg.norm(r)
    cos = o @ r / (np.linalg.norm(o) * np.linalg.norm(r))
    mre = np.mean(np.abs(o - r)) / (np.mean(np.abs(r)) + 1e-5)
    return float(rel_l2), float(cos), float(mre)


def tuned(key_prefix: str) -> str:
    """The configuration the autotuner settled on for the last shape with this key prefix."""
    hits = [v for k, v in DEFAULT_TUNER.cache.items() if k.startswith(key_prefix)]
    if not hits:
        return "untuned (first candidate)"
    c = hits[-1]
    return f"{c.backend} {'x'.join(map(str, c.blocks))} w{c.num_warps} s{c.num_stages}"


def run_cases(cases, rows, label, flops, ref_of):
    """Time each case (name → (fn, arg sets, post)); the first successful row is the ratio baseline."""
    base = None
    for name, (fn, sets, post, config) in cases.items():
        try:
            out = post(fn(*sets[0]))
            t, clock = device_time(fn, sets)
        except Exception as e:  # a baseline this backend lacks, or a kernel that failed to compile
            rows.append([name, label, "n/a", type(e).__name__ + ": " + str(e).splitlines()[0][:60], "", "", "", "", ""])
            continue
        base = base or t
        rows.append([name, label, t * 1e3, flops / t / 1e12, base / t, *accuracy(out, ref_of(name)), config() + f" ({clock})"])


DN_KMAJOR = (((1,), (1,)), ((), ()))  # (M, K) · (N, K)ᵀ


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def fixed(text: str):
    """A config column that does not depend on tuning."""
    return lambda: text


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
            g = min(128, n)
            codes = jnp.clip(jnp.round(w / (jnp.max(jnp.abs(w)) / 7)), -8, 7).astype(jnp.int8)
            s4 = jnp.full((n, n // g), jnp.max(jnp.abs(w)) / 7, jnp.float32)
            sets.append(dict(a=a, w=w, a8=a8, w8=w8, sa=sa, sw=sw, ab=a.astype(jnp.bfloat16), wb=w.astype(jnp.bfloat16),
                             codes=codes, s4=s4, packed=pack_int4_kernel_layout(codes, 128 if n >= 128 else n)))  # fmt: skip
        s0 = sets[0]
        ref_float = np.asarray(s0["a"], np.float64) @ np.asarray(s0["w"], np.float64).T
        ref_int = (np.asarray(s0["a8"], np.float64) * np.asarray(s0["sa"])[:, None]) @ (
            np.asarray(s0["w8"], np.float64) * np.asarray(s0["sw"])[:, None]).T  # fmt: skip
        ref_w4 = np.asarray(s0["ab"], np.float64) @ (np.asarray(s0["codes"], np.float64) * float(s0["s4"][0, 0])).T
        scale_outer = np.outer(np.asarray(s0["sa"]), np.asarray(s0["sw"]))
        pick = lambda *names, sets=sets: [tuple(s[k] for k in names) for s in sets]  # noqa: E731
        cases = {
            "XLA bf16 dot": (jax.jit(lambda a, w: jax.lax.dot_general(a, w, DN_KMAJOR)), pick("ab", "wb"), f64, fixed("XLA")),
            "XLA int8 dot_general→int32": (jax.jit(lambda a, w: jax.lax.dot_general(a, w, DN_KMAJOR, preferred_element_type=jnp.int32)),
                                           pick("a8", "w8"), lambda o: f64(o) * scale_outer, fixed("XLA")),
            "qjax W8A8, autotuned (bf16 out)": (jax.jit(lambda a, sa, w, sw: w8a8_matmul(a, sa, w, sw)), pick("a8", "sa", "w8", "sw"),
                                                f64, lambda: tuned(f"('w8a8', {n}, {n}, {n}")),
        }  # fmt: skip
        if jax_triton_available():
            cfg = KernelConfig((128, 128, 128), 4, 3, backend="triton")
            cases["qjax W8A8, jax-triton kernel"] = (jax.jit(lambda a, sa, w, sw: w8a8_matmul(a, sa, w, sw, blocks=cfg)),
                                                     pick("a8", "sa", "w8", "sw"), f64, fixed("triton 128x128x128 w4 s3"))  # fmt: skip
        cases[f"qjax W4A16 g{min(128, n)}, autotuned"] = (
            jax.jit(lambda x, p, s: weight_only_matmul(x, p, s, bits=4, group_size=min(128, n), block_k=min(128, n))),
            pick("ab", "packed", "s4"), f64, lambda: tuned(f"('weight_only', 4, {n}, {n}, {n}"))
        refs = {"XLA bf16 dot": ref_float}
        run_cases(cases, rows, f"{n}³", 2 * n**3, lambda name: refs.get(name, ref_w4 if "W4A16" in name else ref_int))
    return rows


def bench_attention(seqs, batch=4, heads=32, d=128, causal=False, n_sets=2):
    rows = []
    try:
        from jax.experimental.pallas.ops.gpu import attention as pallas_mha
    except Exception:  # not every jax build ships it
        pallas_mha = None
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu
    except Exception:
        attention_mgpu = None
    on_gpu = jax.default_backend() == "gpu"
    for s in seqs:
        sets = []
        for i in range(n_sets):
            kq, kk, kv = jax.random.split(jax.random.fold_in(jax.random.key(s), i), 3)
            q, k, v = (jax.random.normal(x, (batch, heads, s, d), jnp.float32) for x in (kq, kk, kv))
            sets.append((q, k, v))
        flops = 4 * batch * heads * s * s * d // (2 if causal else 1)
        q, k, v = sets[0]
        ref = jax.nn.dot_product_attention(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)), is_causal=causal).transpose(0, 2, 1, 3)
        bthd = [tuple(x.astype(jnp.bfloat16).transpose(0, 2, 1, 3) for x in st) for st in sets]  # (B, T, H, D)
        to_bhtd = lambda o: np.asarray(o.astype(jnp.float32).transpose(0, 2, 1, 3))  # noqa: E731
        impl = "cudnn" if on_gpu else None
        cases = {f"jax.nn.dot_product_attention bf16 ({impl or 'xla'})": (
            jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)), bthd, to_bhtd, fixed(impl or "xla"))}
        if pallas_mha is not None and on_gpu:
            cases["Pallas flash attention bf16 (Triton, jax ops)"] = (
                jax.jit(lambda q, k, v: pallas_mha.mha(q, k, v, segment_ids=None, causal=causal)), bthd, to_bhtd, fixed("jax defaults"))
        if attention_mgpu is not None and on_gpu and d in (64, 128, 256):
            cfg = attention_mgpu.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2, causal=causal)
            cases["Pallas flash attention bf16 (Mosaic GPU, jax ops)"] = (
                jax.jit(lambda q, k, v: attention_mgpu.attention(q, k, v, cfg)), bthd, to_bhtd, fixed("64x64, 2 stages"))
        for pv in ("int8", "fp8", "bf16"):
            qsets = [quantize_qkv(*st, pv=pv) for st in sets]
            fn = jax.jit(lambda *a, pv=pv: int8_flash_attention(*a, causal=causal, pv=pv))
            cases[f"qjax INT8 QK + {pv} PV, autotuned"] = (fn, qsets, lambda o: np.asarray(o.astype(jnp.float32)),
                                                         lambda pv=pv: tuned(f"('int8_attention', '{pv}', {batch}, {heads}, {heads}, {s}"))  # fmt: skip
        run_cases(cases, rows, s, flops, lambda name: ref)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, interpret mode on CPU")
    p.add_argument("--out", default=None)
    p.add_argument("--gemm-sizes", default=None, help="comma-separated M=N=K sizes")
    p.add_argument("--seqs", default=None, help="comma-separated sequence lengths")
    args = p.parse_args(argv)
    ints = lambda text, default: [int(x) for x in text.split(",")] if text else default  # noqa: E731
    gemm_sizes = ints(args.gemm_sizes, [64, 128] if args.smoke else [1024, 2048, 4096, 8192, 16384])
    seqs = ints(args.seqs, [64, 128] if args.smoke else [1024, 2048, 4096, 8192, 16384])
    attn_kw = dict(batch=1, heads=2, d=64) if args.smoke else dict(batch=4, heads=32, d=128)
    if jax.default_backend() == "gpu":  # tune eagerly first: inside jit the tuner can only take its first candidate
        for n in gemm_sizes:
            a8, w8 = jnp.ones((n, n), jnp.int8), jnp.ones((n, n), jnp.int8)
            w8a8_matmul(a8, jnp.ones(n), w8, jnp.ones(n))
            g = min(128, n)
            weight_only_matmul(jnp.ones((n, n), jnp.bfloat16), jnp.zeros((n, n // 2), jnp.uint8), jnp.ones((n, n // g)),
                               bits=4, group_size=g, block_k=g)  # fmt: skip
        for s in seqs:
            for causal in (False, True):
                x = jnp.ones((attn_kw["batch"], attn_kw["heads"], s, attn_kw["d"]), jnp.float32)
                for pv in ("int8", "fp8", "bf16"):
                    int8_flash_attention(*quantize_qkv(x, x, x, pv=pv), causal=causal, pv=pv)
    header = ["kernel", "size", "ms", "TOPS/TFLOPS", "× first row", "rel L2", "cosine", "MRE", "config (clock)"]
    text = "\n\n".join([
        f"# qjax kernel benchmark\n\n{environment()}",
        "## GEMM (M=N=K; ratios vs XLA bf16)\n\n" + markdown_table(header, bench_gemm(gemm_sizes)),
        "## Attention, non-causal forward (ratios vs cuDNN bf16)\n\n" + markdown_table(header, bench_attention(seqs, **attn_kw)),
        "## Attention, causal forward (ratios vs cuDNN bf16)\n\n" + markdown_table(header, bench_attention(seqs, causal=True, **attn_kw)),
    ])  # fmt: skip
    return emit(text, args.out)


if __name__ == "__main__":
    main()

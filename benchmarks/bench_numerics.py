"""Quantize/dequantize throughput and integer-dot vs float-dot time on the current device.

Run: python -m benchmarks.bench_numerics [--sizes 256 512 1024] [--out benchmarks/results/numerics_cpu.md]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import qjax.numerics as qn
import qjax.ops as qo
from benchmarks.common import emit, environment, markdown_table, time_fn

SPECS = {
    "int8 per-channel": qn.QuantSpec("int8", qn.per_axis(1)),
    "int4 group-128": qn.QuantSpec("int4", qn.per_group(0, 128)),
    "uint4 asym group-128": qn.QuantSpec("uint4", qn.per_group(0, 128), symmetric=False),
    "fp8 e4m3 per-tensor": qn.QuantSpec("fp8_e4m3"),
    "nf4 group-64": qn.QuantSpec("nf4", qn.per_group(0, 64)),
    "mxfp4": qn.mxfp4(axis=0),
}


def bench_quantize(n: int) -> list[list]:
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    rows = []
    for name, spec in SPECS.items():
        q_fn = jax.jit(lambda x, spec=spec: qn.quantize(x, spec))
        q = q_fn(x)
        dq_fn = jax.jit(lambda q: q.dequantize())
        tq, tdq = time_fn(q_fn, x), time_fn(dq_fn, q)
        gb = x.nbytes / 1e9
        rows.append([name, f"{n}x{n}", gb / tq, gb / tdq, q.bits_per_element])
    return rows


def bench_dot(n: int) -> list[list]:
    k1, k2 = jax.random.split(jax.random.key(1))
    x = jax.random.normal(k1, (n, n), jnp.float32)
    w = jax.random.normal(k2, (n, n), jnp.float32)
    dn = (((1,), (0,)), ((), ()))
    flops = 2 * n**3
    a = qn.quantize(x, qn.QuantSpec("int8", qn.per_axis(0)))
    b = qn.quantize(w, qn.QuantSpec("int8", qn.per_axis(1)))
    b4 = qn.quantize(w, qn.QuantSpec("int4", qn.per_group(0, 128)))
    a8, b8 = a.values, b.values
    cases = {
        "f32 jnp.dot": (jax.jit(lambda x, w: x @ w), (x, w)),
        "bf16 jnp.dot": (jax.jit(lambda x, w: x @ w), (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))),
        "int8 lax.dot (raw int32)": (jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.int32)), (a8, b8)),
        "qjax W8A8 int path": (jax.jit(lambda a, b: qo.dot_general(a, b, dn, mode="int")), (a, b)),
        "qjax W4(g128)A8 int path": (jax.jit(lambda a, b: qo.dot_general(a, b, dn, mode="int")), (a, b4)),
        "qjax W8A8 fake path": (jax.jit(lambda a, b: qo.dot_general(a, b, dn, mode="fake")), (a, b)),
    }
    base = None
    rows = []
    for name, (fn, args) in cases.items():
        t = time_fn(fn, *args)
        base = base or t
        rows.append([name, f"{n}³", t * 1e3, flops / t / 1e9, base / t])
    return rows


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = p.parse_args(argv)
    q_rows = [r for n in args.sizes for r in bench_quantize(n)]
    d_rows = [r for n in args.sizes for r in bench_dot(n)]
    text = "\n\n".join([
        f"# qjax numerics benchmark\n\n{environment()}",
        "## quantize / dequantize throughput (GB/s of float32 input)\n\n"
        + markdown_table(["spec", "shape", "quantize GB/s", "dequantize GB/s", "bits/elem"], q_rows),
        "## matmul: integer path vs float (median ms)\n\n"
        + markdown_table(["op", "size", "ms", "GOP/s", "speed vs f32"], d_rows),
    ])  # fmt: skip
    return emit(text, args.out)


if __name__ == "__main__":
    main()

"""A self-contained demonstration: quantize the matmuls of a random MLP with several specs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import qjax.numerics as qn
import qjax.ops as qo

RECIPES: dict[str, tuple[qn.QuantSpec | None, qn.QuantSpec | None]] = {
    "W8A8 per-channel/per-token (int path)": (qn.QuantSpec("int8", qn.per_axis(1)), qn.QuantSpec("int8", qn.per_token())),
    "W4A16 group-128": (qn.QuantSpec("int4", qn.per_group(0, 128)), None),
    "W4A8 group-128 (int path)": (qn.QuantSpec("int4", qn.per_group(0, 128)), qn.QuantSpec("int8", qn.per_token())),
    "W4A16 nf4 group-64": (qn.QuantSpec("nf4", qn.per_group(0, 64)), None),
    "fp8 e4m3 W8A8": (qn.QuantSpec("fp8_e4m3", qn.per_axis(1)), qn.QuantSpec("fp8_e4m3", qn.per_token())),
    "mxfp4 W4A4": (qn.mxfp4(axis=0), qn.mxfp4(axis=-1)),
}


def run_demo(seed: int = 0, d: int = 512, hidden: int = 1024, tokens: int = 256) -> str:
    """Relative output error and weight bytes of each recipe on a random 2-layer MLP."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    w1 = jax.random.normal(k1, (d, hidden)) / np.sqrt(d)
    w2 = jax.random.normal(k2, (hidden, d)) / np.sqrt(hidden)
    x = jax.random.normal(k3, (tokens, d))
    dn = (((1,), (0,)), ((), ()))

    def mlp(x, w1, w2, wspec=None, aspec=None):
        mode = "int" if wspec is not None else "fake"
        h = jax.nn.gelu(qo.dot_general(x, w1, dn, lhs_spec=aspec, mode=mode))
        return qo.dot_general(h, w2, dn, lhs_spec=aspec, mode=mode)

    ref = mlp(x, w1, w2)
    rows = [("float32", 0.0, (w1.nbytes + w2.nbytes) / 1e6)]
    for name, (wspec, aspec) in RECIPES.items():
        q1, q2 = qn.quantize(w1, wspec), qn.quantize(w2, wspec)
        y = mlp(x, q1, q2, wspec, aspec)
        rel = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
        rows.append((name, rel, (q1.nbytes + q2.nbytes) / 1e6))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'recipe'.ljust(width)}  rel. L2 error  weight MB", "-" * (width + 27)]
    lines += [f"{n.ljust(width)}  {e:13.4f}  {mb:9.3f}" for n, e, mb in rows]
    return "\n".join(lines)

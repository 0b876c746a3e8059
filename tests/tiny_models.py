"""Tiny Flax NNX models for transform tests: a one-block transformer and a stack for nnx.scan."""

import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
    """Pre-norm-free transformer block: causal attention (q, k, v, o) + GELU MLP (up, down)."""

    def __init__(self, d: int, heads: int, hidden: int, rngs: nnx.Rngs):
        self.heads = heads
        self.q = nnx.Linear(d, d, rngs=rngs)
        self.k = nnx.Linear(d, d, rngs=rngs)
        self.v = nnx.Linear(d, d, rngs=rngs)
        self.o = nnx.Linear(d, d, rngs=rngs)
        self.up = nnx.Linear(d, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, d, rngs=rngs)

    def __call__(self, x):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        s = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(d // self.heads)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e30)
        a = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v).reshape(b, t, d)
        h = x + self.o(a)
        return h + self.down(jax.nn.gelu(self.up(h)))


def block_numpy(params: dict, x, heads: int, wq=lambda w: w, aq=lambda a: a):
    """float64 numpy forward of `Block` with weight/activation fake-quant functions applied per Linear."""
    import numpy as np

    def lin(name, a):
        w, bias = params[name]
        return aq(a) @ wq(w) + bias

    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, heads, d // heads)  # noqa: E731
    q, k, v = split(lin("q", x)), split(lin("k", x)), split(lin("v", x))
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d // heads)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    a = np.einsum("bhts,bshd->bthd", p, v).reshape(b, t, d)
    h = x + lin("o", a)
    u = lin("up", h)
    g = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
    return h + lin("down", g)


def block_params(block: Block) -> dict:
    import numpy as np

    return {n: (np.asarray(getattr(block, n).kernel[...], np.float64), np.asarray(getattr(block, n).bias[...], np.float64))
            for n in ("q", "k", "v", "o", "up", "down")}  # fmt: skip


class Stack(nnx.Module):
    """`n` Blocks with stacked parameters, applied with nnx.scan (optionally rematerialised)."""

    def __init__(self, n: int, d: int, heads: int, hidden: int, rngs: nnx.Rngs, remat: bool = False):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(d, heads, hidden, rngs)

        self.layers = make(rngs)
        self.remat = remat

    def __call__(self, x):
        def body(block, x):
            return block(x)

        if self.remat:
            body = nnx.remat(body)

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def scan(block, x):
            return body(block, x)

        return scan(self.layers, x)

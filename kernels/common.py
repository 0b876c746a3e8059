"""Helpers shared by the Pallas kernels: backend choice, padding, and a small per-shape autotuner."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def interpret_default(interpret: bool | None) -> bool:
    """Kernels run natively on GPU and in Pallas interpret mode everywhere else."""
    return (not on_gpu()) if interpret is None else interpret


def pallas_call(kernel, args, *, out_shape, grid, in_specs, out_specs, interpret: bool, name: str,
                poison: bool = False, fill=jnp.nan) -> jax.Array:  # fmt: skip
    """`pl.pallas_call(...)(*args)`; with `poison`, the output buffer is first filled with `fill` and
    passed in aliased to the output, so a tile the kernel never writes stays visible in the result."""
    aliases = {}
    if poison:
        args = [*args, jnp.full(out_shape.shape, fill, out_shape.dtype)]
        in_specs = [*in_specs, out_specs]
        aliases = {len(args) - 1: 0}
        inner = kernel

        def kernel(*refs):
            *ins, _poisoned, out = refs
            return inner(*ins, out)

    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          input_output_aliases=aliases, interpret=interpret, name=name)(*args)  # fmt: skip


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_to(x: jax.Array, shape: Sequence[int], value=0) -> jax.Array:
    """Pad trailing edges of `x` up to `shape`."""
    if tuple(x.shape) == tuple(shape):
        return x
    return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)], constant_values=value)


@dataclasses.dataclass
class Autotuner:
    """Times candidate block configurations once per (kernel, shape, dtype) key and remembers the fastest.

    On CPU (interpret mode) timing is meaningless, and under a trace (jit/grad) nothing can be timed, so
    then the cached choice or the first candidate is used without timing (call once eagerly to tune).
    """

    cache: dict = dataclasses.field(default_factory=dict)
    repeats: int = 5

    def pick(self, key, candidates: Sequence, run: Callable[[object], jax.Array], traced: bool = False):
        if key in self.cache:
            return self.cache[key]
        if traced:
            return candidates[0]  # don't cache: an eager call may still tune this shape
        if not on_gpu() or len(candidates) == 1:
            self.cache[key] = candidates[0]
            return candidates[0]
        best, best_t = candidates[0], float("inf")
        for cand in candidates:
            try:
                jax.block_until_ready(run(cand))  # compile + warm up
                ts = []
                for _ in range(self.repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(run(cand))
                    ts.append(time.perf_counter() - t0)
                t = statistics.median(ts)
            except Exception:  # a configuration the compiler rejects (e.g. too much shared memory)
                continue
            if t < best_t:
                best, best_t = cand, t
        self.cache[key] = best
        return best


DEFAULT_TUNER = Autotuner()

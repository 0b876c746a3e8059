"""Helpers shared by the kernels: backend choice, launch configurations, padding, and a per-shape autotuner.

Pallas kernels here are lowered with the Triton backend (named explicitly: since jax 0.9 a bare
`pl.pallas_call` on GPU goes to Mosaic GPU, whose rules these kernels are not written for).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def interpret_default(interpret: bool | None) -> bool:
    """Kernels run natively on GPU and in Pallas interpret mode everywhere else."""
    return (not on_gpu()) if interpret is None else interpret


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: block sizes (in the kernel's own order), Triton's warps and stages, and
    the implementation: "pallas" (Pallas, Triton backend) or "triton" (a hand-written kernel via jax-triton)."""

    blocks: tuple[int, ...]
    num_warps: int = 4
    num_stages: int = 2
    backend: str = "pallas"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> KernelConfig:
        return cls(tuple(d["blocks"]), d["num_warps"], d["num_stages"], d.get("backend", "pallas"))


def jax_triton_available() -> bool:
    """Hand-written Triton kernels run only on a GPU with the optional `jax-triton` extra installed."""
    return on_gpu() and all(importlib.util.find_spec(m) is not None for m in ("triton", "jax_triton"))


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def tile(preferred: int, dim: int) -> int:
    """A block size for a dimension of length `dim`: `preferred`, shrunk for short dimensions to the next
    power of two ≥ 16 (Triton tiles are powers of two; 16 is the smallest MMA side)."""
    if preferred < 16 or preferred & (preferred - 1):
        raise ValueError(f"block sizes must be powers of two ≥ 16, got {preferred}")
    return min(preferred, max(16, next_pow2(dim)))


def fit(candidates: Sequence[KernelConfig], dims: Sequence[int]) -> list[KernelConfig]:
    """Shrink each candidate's blocks to the problem (`dims`, one per block) and drop duplicates."""
    fitted: list[KernelConfig] = []
    for c in candidates:
        f = dataclasses.replace(c, blocks=tuple(tile(b, d) for b, d in zip(c.blocks, dims)))
        if f not in fitted:
            fitted.append(f)
    return fitted


def pallas_call(kernel, args, *, out_shape, grid, in_specs, out_specs, interpret: bool, name: str,
                config: KernelConfig, poison: bool = False, fill=jnp.nan) -> jax.Array:  # fmt: skip
    """`pl.pallas_call(...)(*args)` on the Triton backend; with `poison`, the output buffer is first filled
    with `fill` and passed in aliased to the output, so a tile the kernel never writes stays visible."""
    aliases = {}
    if poison:
        args = [*args, jnp.full(out_shape.shape, fill, out_shape.dtype)]
        in_specs = [*in_specs, out_specs]
        aliases = {len(args) - 1: 0}
        inner = kernel

        def kernel(*refs):
            *ins, _poisoned, out = refs
            return inner(*ins, out)

    params = pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          input_output_aliases=aliases, interpret=interpret, name=name,
                          compiler_params=params)(*args)  # fmt: skip


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_to(x: jax.Array, shape: Sequence[int], value=0) -> jax.Array:
    """Pad trailing edges of `x` up to `shape`."""
    if tuple(x.shape) == tuple(shape):
        return x
    return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)], constant_values=value)


def is_traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def _default_cache_path() -> str | None:
    """`$QJAX_AUTOTUNE_CACHE`, else ~/.cache/qjax/autotune.json; "" or "none" keeps choices in memory only."""
    path = os.environ.get("QJAX_AUTOTUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "qjax", "autotune.json"))
    return None if path.lower() in ("", "none") else path


@dataclasses.dataclass
class Autotuner:
    """Times candidate configurations once per (kernel, shape, dtype) key and remembers the fastest.

    Choices are kept per device kind and jax/qjax version, and with a `path` also on disk (written atomically),
    so a tuned shape is not re-timed in the next process. On CPU (interpret mode) timing is meaningless,
    and under a trace (jit/grad) nothing can be timed: then the cached choice or the first candidate is
    used without timing (call once eagerly to tune).
    """

    path: str | None = None
    repeats: int = 5
    cache: dict = dataclasses.field(default_factory=dict)
    _loaded: bool = dataclasses.field(default=False, repr=False)

    @staticmethod
    def _scope() -> str:
        from qjax import __version__  # kernels are imported while qjax itself is still loading

        dev = jax.devices()[0]
        return f"{getattr(dev, 'device_kind', dev.platform)}|jax {jax.__version__}|qjax {__version__}"

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if not self.path or not os.path.exists(self.path):
            return
        try:
            with open(self.path) as f:
                stored = json.load(f).get(self._scope(), {})
            self.cache.update({k: KernelConfig.from_json(v) for k, v in stored.items()})
        except (OSError, ValueError, KeyError, TypeError):  # a corrupt cache only costs re-tuning
            pass

    def _save(self) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        try:
            with open(self.path) as f:
                everything = json.load(f)
        except (OSError, ValueError):
            everything = {}
        everything[self._scope()] = {k: v.to_json() for k, v in self.cache.items()}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(self.path)), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(everything, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def pick(self, key, candidates: Sequence[KernelConfig], run: Callable[[KernelConfig], jax.Array],
             traced: bool = False) -> KernelConfig:  # fmt: skip
        key = repr(key)
        self._load()
        if key in self.cache:
            return self.cache[key]
        if traced:
            return candidates[0]  # not cached: an eager call may still tune this shape
        if not on_gpu() or len(candidates) == 1:
            return candidates[0]  # nothing worth remembering
        best, best_t = None, float("inf")
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
        if best is None:
            raise RuntimeError(f"autotuning {key}: every candidate configuration failed to compile or run")
        self.cache[key] = best
        self._save()
        return best


DEFAULT_TUNER = Autotuner(path=_default_cache_path())


def choose_config(blocks, candidates: Sequence[KernelConfig], dims: Sequence[int], key, run, traced: bool) -> KernelConfig:
    """A kernel's launch configuration: the caller's `KernelConfig`, or its block sizes fitted to `dims`,
    or (blocks=None) the default autotuner's pick among `candidates`."""
    if isinstance(blocks, KernelConfig):
        return blocks
    if blocks is not None:
        return fit([KernelConfig(tuple(blocks))], dims)[0]
    return DEFAULT_TUNER.pick(key, fit(candidates, dims), run, traced=traced)

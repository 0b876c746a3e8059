"""Statistics of module inputs on calibration batches: composable observers and one `collect`.

An observer is an (init, update) pair of pure functions: `init(features, dtype) -> state` and
`update(state, x) -> state` for an input x (..., features). `collect(model, batches, where, observer)`
runs the model on each batch (jitted) with the matched modules' inputs folded into their observer
states, and returns {module path: state}. Nothing in the model is changed: it works on a copy whose
matched modules are wrapped by taps.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qjax.models.structure import unstack_layers
from qjax.numerics import ranges
from qjax.transforms.nnx_modules import set_child
from qjax.transforms.nnx_quantize import path_str


class Observer(NamedTuple):
    """init(features, dtype) -> state; update(state, x (..., features)) -> state (both pure)."""

    init: Callable[[int], Any]
    update: Callable[[Any, jax.Array], Any]


def _rows(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1]).astype(jnp.float32)


def absmax() -> Observer:
    """Per-channel max |x| (SmoothQuant, LLM.int8(), range calibration)."""
    return Observer(lambda f: jnp.zeros((f,), jnp.float32), lambda s, x: jnp.maximum(s, jnp.max(jnp.abs(_rows(x)), axis=0)))


def minmax() -> Observer:
    """Per-channel min and max (asymmetric ranges, OS+ shifts)."""
    return Observer(
        lambda f: {"min": jnp.full((f,), jnp.inf, jnp.float32), "max": jnp.full((f,), -jnp.inf, jnp.float32)},
        lambda s, x: {"min": jnp.minimum(s["min"], jnp.min(_rows(x), 0)), "max": jnp.maximum(s["max"], jnp.max(_rows(x), 0))},
    )


def mean_abs() -> Observer:
    """Per-channel running sum of |x| and token count; `mean_of` gives the mean (AWQ)."""
    return Observer(
        lambda f: {"sum": jnp.zeros((f,), jnp.float32), "count": jnp.zeros((), jnp.float32)},
        lambda s, x: {"sum": s["sum"] + jnp.sum(jnp.abs(_rows(x)), 0), "count": s["count"] + _rows(x).shape[0]},
    )


def channel_norm() -> Observer:
    """Per-channel sum over samples of the L2 norm over each sample's tokens, and the sample count (BitStack)."""

    def update(s, x):
        xs = x.reshape(-1, *x.shape[-2:]).astype(jnp.float32)  # (samples, tokens, features)
        return {"sum": s["sum"] + jnp.sum(jnp.linalg.norm(xs, axis=1), 0), "count": s["count"] + xs.shape[0]}

    return Observer(lambda f: {"sum": jnp.zeros((f,), jnp.float32), "count": jnp.zeros((), jnp.float32)}, update)


def xtx() -> Observer:
    """Σ x xᵀ over tokens and the token count: GPTQ's H = 2/N Σ x xᵀ (see `hessian`)."""
    return Observer(
        lambda f: {"sum": jnp.zeros((f, f), jnp.float32), "count": jnp.zeros((), jnp.float32)},
        lambda s, x: {"sum": s["sum"] + _rows(x).T @ _rows(x), "count": s["count"] + _rows(x).shape[0]},
    )


def histogram(bins: int = 2048) -> Observer:
    """Per-tensor histogram of |x| over [0, amax] (`qjax.numerics.ranges`); values above amax land in the
    last bin. Start it from `histogram_start(amax, bins)` (amax from a previous `absmax` pass) through
    `collect(..., initial=)`. Used by percentile, MSE and KL (entropy) calibration."""
    return Observer(lambda f: ranges.histogram_init((), bins), lambda h, x: ranges.histogram_update(h, x, h.amax))


def histogram_start(amax, bins: int = 2048) -> ranges.Histogram:
    """An empty histogram over [0, max(amax)]."""
    return ranges.Histogram(jnp.zeros((bins,), jnp.float32), jnp.max(jnp.asarray(amax, jnp.float32)))


def nonfinite() -> Observer:
    """Count of NaN/Inf input values (checked before statistics are turned into transforms)."""
    return Observer(lambda f: jnp.zeros((), jnp.float32), lambda s, x: s + jnp.sum(~jnp.isfinite(x)).astype(jnp.float32))


def combine(**observers: Observer) -> Observer:
    """Several observers at once, as one observer over a dict of states."""
    return Observer(
        lambda f: {k: o.init(f) for k, o in observers.items()},
        lambda s, x: {k: o.update(s[k], x) for k, o in observers.items()},
    )


def mean_of(state: dict) -> jax.Array:
    """Mean from a {sum, count} state."""
    return state["sum"] / jnp.maximum(state["count"], 1.0)


def hessian(state: dict) -> jax.Array:
    """GPTQ's H = 2/N Σ x xᵀ from an `xtx` state."""
    return 2.0 * state["sum"] / jnp.maximum(state["count"], 1.0)


# ---- collection -------------------------------------------------------------------------------------------


class _Stat(nnx.Variable):
    """An observer's state inside a tap."""


class _Tap(nnx.Module):
    """Wraps a module: folds its first positional input into an observer state, then calls it."""

    def __init__(self, inner: nnx.Module, observer: Observer, features: int):
        self.inner = inner
        self.observer = observer
        self.state = _Stat(observer.init(features))
        self.bad = _Stat(jnp.zeros((), jnp.float32))  # NaN/Inf inputs: max/min reductions may skip them silently

    def __call__(self, x, *args, **kwargs):
        self.state.set_value(self.observer.update(self.state.get_value(), x))
        self.bad.set_value(self.bad.get_value() + jnp.sum(~jnp.isfinite(x)).astype(jnp.float32))
        return self.inner(x, *args, **kwargs)


class _ShapeTap(nnx.Module):
    """Records the feature count of its module's input while the model is traced abstractly."""

    def __init__(self, inner: nnx.Module, record: dict, path: str):
        self.inner, self.path = inner, path
        self.record = nnx.static(record) if hasattr(nnx, "static") else record

    def __call__(self, x, *args, **kwargs):
        self.record[self.path] = x.shape[-1]
        return self.inner(x, *args, **kwargs)


Where = str | Callable[[str, nnx.Module], bool]


def _matcher(where: Where) -> Callable[[str, nnx.Module], bool]:
    if callable(where):
        return where
    pattern = re.compile(where)
    return lambda path, module: pattern.fullmatch(path) is not None


def _matched(model: nnx.Module, where: Where) -> list[tuple[tuple, str]]:
    match = _matcher(where)
    found = [(p, path_str(p)) for p, m in nnx.iter_modules(model) if p and match(path_str(p), m)]
    # keep the outermost match only (a tap around a module already sees what its children see first)
    return [(p, s) for p, s in found if not any(q != p and p[: len(q)] == q for q, _ in found)]


def collect(model: nnx.Module, batches: Iterable, where: Where, observer: Observer, *, call: Callable | None = None,
            initial: dict[str, Any] | None = None, progress: bool = False, desc: str = "collect") -> dict[str, Any]:  # fmt: skip
    """Observer state of the input of every module matched by `where` (a regex on module paths, or a
    predicate (path, module) -> bool), after running `call(model, batch)` (default `model(batch)`) on
    each batch. Stacked (scan_layers) Llama models are unstacked on the copy, so paths are per layer.

    `initial` gives per-path starting states instead of `observer.init` (e.g. `histogram_start`).
    Non-finite inputs are counted for every tap and are an error naming the module (`desc` names the caller).
    """
    call = call or (lambda m, b: m(b))
    batches = list(batches)
    if not batches:
        raise ValueError("collect needs at least one calibration batch")
    model = nnx.clone(unstack_layers(model) if hasattr(model, "config") else model)
    targets = _matched(model, where)
    if not targets:
        raise ValueError(f"collect: no module path matches {where!r}")
    features: dict[str, int] = {}
    shape_model = nnx.clone(model)
    for p, s in targets:
        set_child(shape_model, p, _ShapeTap(_get(shape_model, p), features, s))
    graphdef, state = nnx.split(shape_model)
    jax.eval_shape(lambda st, b: call(nnx.merge(graphdef, st), b), state, jnp.asarray(batches[0]))
    taps = {}
    for p, s in targets:
        if s not in features:
            continue  # matched but never called (e.g. a module the forward skips)
        tap = _Tap(_get(model, p), observer, features[s])
        if initial is not None and s in initial:
            tap.state.set_value(initial[s])
        set_child(model, p, tap)
        taps[s] = tap

    @nnx.jit
    def run(m, b):
        call(m, b)

    for b in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        run(model, jnp.asarray(b))
    for s, tap in taps.items():
        bad = int(tap.bad.get_value())
        if bad:
            raise ValueError(f"{desc}: the input of {s} contains {bad} NaN/Inf value(s) on the calibration data; "
                             "its statistics would be meaningless")  # fmt: skip
    return {s: tap.state.get_value() for s, tap in taps.items()}


def _get(root, path: tuple):
    node = root
    for k in path:
        node = node[k] if isinstance(k, int) else getattr(node, k)
    return node


def batched(windows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Calibration windows (n, L) split into batches."""
    return [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]


def check_finite(stats: dict, what: str) -> dict:
    """`stats` unchanged if every value is finite; otherwise an error naming the module and the count."""
    for path, st in stats.items():
        bad = sum(int(np.sum(~np.isfinite(np.asarray(a)))) for a in jax.tree.leaves(st))
        if bad:
            raise ValueError(f"{what}: statistics of {path} contain {bad} non-finite value(s); the calibration "
                             "data (or the activations it produced) are not finite")  # fmt: skip
    return stats

"""Zero-order (MeZO / ZO-Bench) finetuning core on plain pytrees: SPSA estimates and seed-replayed optimizers.

Only scalars cross from the estimate to the update: direction j of step t is
z_leaf = N(0, 1) drawn from fold_in(fold_in(fold_in(key, t), j), path_id(leaf)), regenerated wherever needed,
so a run is reproducible from (key, [(step, g)]) alone (MeZO's compact checkpoint, see `replay`).
Path ids are crc32 of the "/"-joined parameter path (stable across processes, unlike Python's `hash`), so a
leaf's z does not depend on which other leaves exist. Non-float leaves get z = 0 (never perturbed or updated).

Optimizers are (init, update) pairs: `update(params, state, g, key, step) -> (new_params, new_state)`, with g the
(n_directions,) projected gradients of `spsa_grad`; they return new parameters (not Optax-style updates) because
the update is regenerated from the seed. Replay is bit-exact when training applies `jax.jit(opt.update)` as
`replay` does. ZO-SGD-Cons (which needs extra forwards inside the update) is not implemented here.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

PyTree = Any
tree_map = jax.tree_util.tree_map


def _key_name(k: Any) -> str:
    """One path entry as text: dict key, attribute name or sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_ids(params: PyTree) -> PyTree:
    """Stable 31-bit id (crc32 of the "/"-joined path) for every leaf, same structure as params."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    ids = [zlib.crc32("/".join(_key_name(k) for k in path).encode()) & 0x7FFFFFFF for path, _ in flat]
    return jax.tree_util.tree_unflatten(treedef, ids)


def perturbation(key: jax.Array, step: int | jax.Array, params: PyTree, ids: PyTree, direction: int | jax.Array = 0) -> PyTree:
    """z ~ N(0, I) per leaf from fold_in(fold_in(fold_in(key, step), direction), path_id); depends on nothing else."""
    dkey = jax.random.fold_in(jax.random.fold_in(key, step), direction)

    def leaf(p: jax.Array, pid: int) -> jax.Array:
        p = jnp.asarray(p)
        if not jnp.issubdtype(p.dtype, jnp.floating):
            return jnp.zeros_like(p)
        return jax.random.normal(jax.random.fold_in(dkey, pid), p.shape, p.dtype)

    return tree_map(leaf, params, ids)


def _check(eps: float, n_directions: int) -> None:
    """Early, named errors for the SPSA hyper-parameters (both must be static Python numbers)."""
    if not float(eps) > 0:
        raise ValueError(f"zo: eps must be > 0, got eps={eps}")
    if int(n_directions) != n_directions or n_directions < 1:
        raise ValueError(f"zo: n_directions must be an integer >= 1, got n_directions={n_directions}")


def _shift(params: PyTree, z: PyTree, scale: float) -> PyTree:
    """θ + scale·z in each leaf's dtype (a new pytree; the input is untouched)."""
    return tree_map(lambda p, zz: (p + scale * zz).astype(jnp.asarray(p).dtype), params, z)


def spsa_grad(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batch: Any, key: jax.Array,
              step: int | jax.Array, eps: float, n_directions: int = 1, one_sided: bool = False
              ) -> tuple[jax.Array, jax.Array]:
    """Projected gradients g_j = (L(θ+εz_j) − L(θ−εz_j))/2ε (or one-sided) and a loss; pure and jit-able.

    Loss returned: L(θ) for one-sided, the mean of (L+ + L−)/2 over directions (= L(θ) + O(ε²)) for two-sided.
    eps and n_directions must be static (closed over or static_argnames under jit).
    """
    _check(eps, n_directions)
    ids = path_ids(params)
    base = loss_fn(params, batch) if one_sided else None

    def one(j: jax.Array) -> tuple[jax.Array, jax.Array]:
        z = perturbation(key, step, params, ids, j)
        lp = loss_fn(_shift(params, z, eps), batch)
        if one_sided:
            return (lp - base) / eps, base
        lm = loss_fn(_shift(params, z, -eps), batch)
        return (lp - lm) / (2 * eps), (lp + lm) / 2

    g, losses = jax.lax.map(one, jnp.arange(n_directions))
    return g, jnp.mean(losses)


def zo_gradient(params: PyTree, g: jax.Array, key: jax.Array, step: int | jax.Array,
                scalar: Callable[[jax.Array], jax.Array] = lambda x: x) -> PyTree:
    """ĝ = 1/n Σ_j scalar(g_j)·z_j in float32, z regenerated from (key, step, j, path)."""
    ids = path_ids(params)
    g = jnp.asarray(g, jnp.float32)

    def body(j: jax.Array, acc: PyTree) -> PyTree:
        z = perturbation(key, step, params, ids, j)
        return tree_map(lambda a, zz: a + scalar(g[j]) * zz.astype(jnp.float32), acc, z)

    acc = jax.lax.fori_loop(0, g.shape[0], body, tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params))
    return tree_map(lambda a: a / g.shape[0], acc)


class ZOOptimizer(NamedTuple):
    """init(params) -> state; update(params, state, g, key, step) -> (new_params, new_state)."""

    init: Callable[[PyTree], PyTree]
    update: Callable[..., tuple[PyTree, PyTree]]


def default_decay_mask(params: PyTree) -> PyTree:
    """MeZO's weight-decay mask: matrices (ndim ≥ 2) decay; biases and norm gains (ndim ≤ 1) do not."""
    return tree_map(lambda p: jnp.ndim(p) >= 2, params)


def _apply(params: PyTree, direction: PyTree, lr: float) -> PyTree:
    """θ − lr·d in float32, cast back to each leaf's dtype; non-float leaves unchanged."""
    def leaf(p: jax.Array, d: jax.Array) -> jax.Array:
        p = jnp.asarray(p)
        if not jnp.issubdtype(p.dtype, jnp.floating):
            return p
        return (p.astype(jnp.float32) - lr * d).astype(p.dtype)
    return tree_map(leaf, params, direction)


def _sgd(lr: float, weight_decay: float, decay_mask: PyTree | Callable | None, scalar: Callable) -> ZOOptimizer:
    """ZO-SGD with a scalar map on g (identity or sign) and masked decoupled-into-gradient weight decay."""
    def update(params, state, g, key, step):
        gh = zo_gradient(params, g, key, step, scalar)
        if weight_decay:
            mask = default_decay_mask(params) if decay_mask is None else decay_mask
            mask = mask(params) if callable(mask) else mask
            gh = tree_map(lambda d, p, m: d + weight_decay * jnp.asarray(p, jnp.float32) * m, gh, params, mask)
        return _apply(params, gh, lr), state
    return ZOOptimizer(lambda params: (), update)


def zo_sgd(lr: float, weight_decay: float = 0.0, decay_mask: PyTree | Callable | None = None) -> ZOOptimizer:
    """MeZO / ZO-SGD: θ −= lr·(1/n Σ g_j z_j + λθ); decay_mask None = `default_decay_mask`."""
    return _sgd(lr, weight_decay, decay_mask, lambda x: x)


def zo_sgd_sign(lr: float, weight_decay: float = 0.0, decay_mask: PyTree | Callable | None = None) -> ZOOptimizer:
    """ZO-SGD-Sign (ZO-Bench code): θ −= lr·(1/n Σ sign(g_j) z_j + λθ)."""
    return _sgd(lr, weight_decay, decay_mask, jnp.sign)


def zo_sgd_momentum(lr: float, beta: float = 0.9) -> ZOOptimizer:
    """ZO-SGD-MMT (torch SGD momentum, no dampening): m = βm + ĝ; θ −= lr·m (+1× params of state)."""
    def update(params, m, g, key, step):
        m = tree_map(lambda mm, d: beta * mm + d, m, zo_gradient(params, g, key, step))
        return _apply(params, m, lr), m
    return ZOOptimizer(lambda params: tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params), update)


def zo_adam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> ZOOptimizer:
    """ZO-Adam: Adam with bias correction on ĝ = 1/n Σ g_j z_j (+2× params of state)."""
    def init(params):
        zeros = tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        return jnp.zeros((), jnp.int32), zeros, zeros

    def update(params, state, g, key, step):
        count, m, v = state
        gh = zo_gradient(params, g, key, step)
        count = count + 1
        m = tree_map(lambda mm, d: b1 * mm + (1 - b1) * d, m, gh)
        v = tree_map(lambda vv, d: b2 * vv + (1 - b2) * d * d, v, gh)
        c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
        d = tree_map(lambda mm, vv: (mm / c1) / (jnp.sqrt(vv / c2) + eps), m, v)
        return _apply(params, d, lr), (count, m, v)
    return ZOOptimizer(init, update)


def replay(params0: PyTree, key: jax.Array, history: Sequence[tuple[int, Any]], optimizer: ZOOptimizer) -> PyTree:
    """Re-apply recorded (step, g) pairs with `jax.jit(optimizer.update)`: the trained params, from seeds alone."""
    update = jax.jit(optimizer.update)
    params, state = params0, optimizer.init(params0)
    for step, g in history:
        params, state = update(params, state, jnp.asarray(g, jnp.float32), key, step)
    return params

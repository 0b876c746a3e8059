"""Quantize custom modules whose matmuls call `jax.lax.dot_general` / `jnp.einsum` directly.

No jax function is patched. The module's call is traced to a jaxpr and re-evaluated by a small
interpreter (the pattern of JAX's "custom jaxpr interpreters" guide):
  - weights are quantized at their source, in their own layout: every `nnx.Param` of two or more
    dimensions is fake-quantized (qat) or stored packed as a QArray (ptq/serve) with the rule's
    weight spec, so the spec's axes mean what they mean on the parameter;
  - activations are quantized where they enter a `dot_general` whose other operand derives from a
    parameter (through any chain of reshapes, transposes, casts), with the rule's activation spec.
The module must be pure (no state updates inside its call). Its matmuls stay float dots of
quantized operands in every mode (serve included): the integer path needs the op-level modules.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.extend import core as jcore

from qjax.numerics import QArray, quantize
from qjax.transforms.apply import float_weight, quantize_activation
from qjax.transforms.nnx_modules import QuantizedOp, QuantizedWeight, set_child
from qjax.transforms.recipe import Rule


class QIntercepted(QuantizedOp):
    """A custom NNX module quantized by jaxpr interpretation (see the module docstring)."""

    def __init__(self, module: nnx.Module, rule: Rule, mode: str, path: str):
        if rule.static_act or rule.gradient == "lsq":
            raise NotImplementedError(f"{path}: static activation scales and LSQ need a Linear/Einsum/Conv module or a dot_general hook")
        self.inner = module
        self.rule, self.path = rule, path
        self.kernel = nnx.data(None)
        self.act_stats = nnx.data(None)
        self.act_scale = nnx.data(None)
        self.weight_scale = nnx.data(None)
        self.mode = "qat"
        self.convert(mode)

    def set_rule(self, rule: Rule, mode: str) -> None:
        """A new rule: float weights are re-quantized by it; packed ones only under the same weight spec."""
        packed = any(isinstance(v.get_value(), QArray) for _, v in nnx.to_flat_state(nnx.state(self.inner, QuantizedWeight)))
        if packed and rule.weight != self.rule.weight:
            raise ValueError(f"{self.path}: the weights are already packed with {self.rule.weight}; quantize the float model instead")
        self.rule = rule
        self.convert(mode)

    def convert(self, mode: str) -> None:
        if self.mode in ("ptq", "serve") and mode in ("qat", "calibrate"):
            raise ValueError(f"{self.path}: cannot go from {self.mode!r} back to {mode!r}: the float weights were packed")
        if mode in ("ptq", "serve") and self.rule.weight is not None:
            for path, var in _weight_params(self.inner):
                value = var.get_value()
                if not isinstance(value, QArray):
                    set_child(self.inner, path, QuantizedWeight(quantize(value, self.rule.weight)))
        self.mode = mode

    def __call__(self, *args, **kwargs):
        rule, mode = self.rule, self.mode
        graphdef, weights, rest = nnx.split(self.inner, (nnx.Param, QuantizedWeight), ...)
        leaves, treedef = jax.tree.flatten(weights, is_leaf=lambda x: isinstance(x, QArray))
        marks = [isinstance(v, QArray) or v.ndim >= 2 for v in leaves]
        sources = [float_weight(v, rule, mode) if w else v for v, w in zip(leaves, marks)]

        def call(weight_leaves, args, kwargs):
            return nnx.merge(graphdef, jax.tree.unflatten(treedef, weight_leaves), rest)(*args, **kwargs)

        closed, out_shape = jax.make_jaxpr(call, return_shape=True)(sources, args, kwargs)
        inputs = sources + jax.tree.leaves((args, kwargs))
        marks = marks + [False] * (len(inputs) - len(sources))
        out = _evaluate(closed.jaxpr, closed.consts, inputs, marks, rule, mode)
        return self._output(jax.tree.unflatten(jax.tree.structure(out_shape), out))


def _weight_params(module: nnx.Module):
    return [(p, v) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param)) if getattr(v.get_value(), "ndim", 0) >= 2]


def _evaluate(jaxpr, consts, inputs, weight_marks, rule: Rule, mode: str):
    """Evaluate `jaxpr`, quantizing activations at dot_generals fed by weight-derived values."""
    env, derived = {}, set()

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, x, w in zip(jaxpr.invars, inputs, weight_marks):
        env[v] = x
        if w:
            derived.add(v)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        flags = [not isinstance(v, jcore.Literal) and v in derived for v in eqn.invars]
        name = eqn.primitive.name
        if name == "dot_general" and any(flags) and not all(flags):
            act = 1 if flags[0] else 0  # the operand that is not a weight
            invals[act] = quantize_activation(invals[act], rule, "ptq" if mode == "serve" else mode)  # float dot here
            outs = [jax.lax.dot_general(*invals, eqn.params["dimension_numbers"], eqn.params.get("precision"),
                                        preferred_element_type=eqn.params.get("preferred_element_type"))]  # fmt: skip
        elif name in ("pjit", "jit", "closed_call") and any(flags):
            inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
            outs = _evaluate(inner.jaxpr, inner.consts, invals, flags, rule, mode)
        else:
            bind_params = eqn.primitive.get_bind_params(eqn.params)  # jax < 0.10 returned (subfuns, params)
            subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
            outs = eqn.primitive.bind(*subfuns, *invals, **params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
            if any(flags) and name != "dot_general":  # reshapes, transposes, casts, slices of a weight
                derived.add(v)
    return [read(v) for v in jaxpr.outvars]

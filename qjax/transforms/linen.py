"""`quantize` for Flax Linen models, through `nn.intercept_methods` (scoped to `apply`, no patching).

Supported ops: `nn.Dense` (kernel (in, out)) and `nn.Embed` (table (vocab, features)), in modes qat,
ptq and serve with dynamic activation scales. PTQ packs the matched kernels into QArrays inside the
params tree (`quantize_params`), so the stored model really shrinks.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import unfreeze

import qjax.ops as qo
from qjax.numerics import QArray, quantize
from qjax.transforms.apply import matmul_mode, quantize_activation, quantize_weight
from qjax.transforms.recipe import Recipe

_KINDS = {nn.Dense: "dot_general", nn.Embed: "embed"}


class QuantizedLinen:
    """A Linen module whose matched Dense/Embed calls are quantized; `init`/`apply` as usual."""

    def __init__(self, module: nn.Module, recipe: Recipe, mode: str):
        if mode == "calibrate":
            raise NotImplementedError("Linen models: calibrate mode is not supported; use an NNX model or dynamic scales")
        if any(r.gradient == "lsq" or r.static_act for r in recipe.rules):
            raise NotImplementedError("Linen models: LSQ and static activation scales need NNX state; use an NNX model")
        self.module, self.recipe, self.mode = module, recipe, mode
        self.matched: dict[str, int] = {}

    def init(self, *args, **kwargs):
        return self.module.init(*args, **kwargs)

    def apply(self, variables, *args, **kwargs):
        with nn.intercept_methods(self._intercept):
            return self.module.apply(variables, *args, **kwargs)

    def _rule_for(self, module: nn.Module):
        kind = next((k for t, k in _KINDS.items() if type(module) is t), None)
        if kind is None:
            return None
        path = ".".join(module.path)
        match = self.recipe.match(path, kind)
        if match is not None:
            self.matched[path] = match[0]
        return None if match is None or match[1].skip else match[1]

    def _intercept(self, next_fun, args, kwargs, context):
        if context.method_name not in ("__call__", "attend"):
            return next_fun(*args, **kwargs)
        rule = self._rule_for(context.module)
        if rule is None:
            return next_fun(*args, **kwargs)
        module, mode = context.module, self.mode
        if isinstance(module, nn.Dense):
            x = quantize_activation(args[0], rule, mode)
            w = quantize_weight(module.get_variable("params", "kernel"), rule, mode)
            y = qo.dot_general(x, w, (((args[0].ndim - 1,), (0,)), ((), ())), mode=matmul_mode(mode))
            bias = module.get_variable("params", "bias") if module.use_bias else None
            return y if bias is None else y + bias
        table = module.get_variable("params", "embedding")
        if context.method_name == "attend":
            x = quantize_activation(args[0], rule, mode)
            return qo.dot_general(x, quantize_weight(table, rule, mode), (((x.ndim - 1,), (1,)), ((), ())), mode=matmul_mode(mode))
        w = quantize_weight(table, rule, "ptq")  # lookups read float rows
        return jnp.take(w, args[0], axis=0)

    def quantize_params(self, variables, *example_args, **example_kwargs):
        """Pack every matched kernel into a QArray (ptq/serve); finds the ops by tracing one example call."""
        self.matched.clear()
        with nn.intercept_methods(self._record):
            jax.eval_shape(lambda v: self.module.apply(v, *example_args, **example_kwargs), variables)
        variables = unfreeze(variables)
        for path, rule_index in self.matched.items():
            rule = self.recipe.rules[rule_index]
            if rule.skip or rule.weight is None:
                continue
            node = variables["params"]
            for key in path.split("."):
                node = node[key]
            name = "kernel" if "kernel" in node else "embedding"
            if not isinstance(node[name], QArray):
                node[name] = quantize(node[name], rule.weight)
        self.recipe.report_unused(set(self.matched.values()))
        return variables

    def _record(self, next_fun, args, kwargs, context):
        if context.method_name in ("__call__", "attend"):
            self._rule_for(context.module)
        return next_fun(*args, **kwargs)

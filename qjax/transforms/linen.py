"""`quantize` for Flax Linen models, through `nn.intercept_methods` (scoped to `apply`, no patching).

Ops: `nn.Dense` and `nn.Embed` are computed by qjax (the integer path in serve mode); `nn.DenseGeneral`,
`nn.Einsum`, `nn.Conv` and `nn.ConvTranspose` keep their own code: their ≥2-D parameters are quantized
in the variables tree before `apply` (in each parameter's own layout) and their input activation is
quantized by the interceptor. Modes qat, calibrate, ptq, serve. Calibration statistics are sown into
the "quant_stats" collection (`apply(..., mutable=["quant_stats"])`); `quantize_params` packs the
matched weights into QArrays inside the params tree (so the stored model really shrinks) and turns
statistics into static activation scales in the "quant_scales" collection.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import unfreeze

import qjax.ops as qo
from qjax.numerics import QArray, quantize
from qjax.transforms import calibration
from qjax.transforms.apply import float_weight, matmul_mode, quantize_activation, quantize_weight
from qjax.transforms.recipe import Recipe

_KINDS = {
    nn.Dense: "dot_general", nn.Embed: "embed",  # computed by qjax
    nn.DenseGeneral: "dot_general", nn.Einsum: "einsum", nn.Conv: "conv", nn.ConvTranspose: "conv",  # own code
}  # fmt: skip
_OWN_CODE = (nn.DenseGeneral, nn.Einsum, nn.Conv, nn.ConvTranspose)


class QuantizedLinen:
    """A Linen module whose matched ops are quantized; `init`/`apply` as usual (see the module docstring)."""

    def __init__(self, module: nn.Module, recipe: Recipe, mode: str):
        if any(r.gradient == "lsq" for r in recipe.rules):
            raise NotImplementedError("Linen models: LSQ scales are NNX parameters; use an NNX model for LSQ")
        self.module, self.recipe, self.mode = module, recipe, mode
        self.matched: dict[str, int] = {}  # module path -> rule index, found by tracing one call
        self.own_code: set[str] = set()  # matched paths whose weights are quantized in the tree

    def init(self, *args, **kwargs):
        return self.module.init(*args, **kwargs)

    def apply(self, variables, *args, **kwargs):
        if not self.matched:
            self._trace(variables, args, kwargs)
        variables = self._tree_weights(variables)
        with nn.intercept_methods(self._intercept):
            return self.module.apply(variables, *args, **kwargs)

    def _trace(self, variables, args, kwargs) -> None:
        """Find the matched ops (and their kinds) by tracing one call abstractly."""
        self.matched.clear()
        self.own_code.clear()
        floats = jax.tree.map(lambda v: v.dequantize() if isinstance(v, QArray) else v, variables, is_leaf=lambda v: isinstance(v, QArray))
        with nn.intercept_methods(self._record):
            jax.eval_shape(lambda v: self.module.apply(v, *args, **kwargs), floats)

    def _tree_weights(self, variables):
        """Quantize (qat: fake, STE) or dequantize (ptq/serve: packed QArrays) the weights of own-code ops."""
        if not self.own_code:
            return variables
        variables = unfreeze(variables)
        for path in self.own_code:
            rule = self.recipe.rules[self.matched[path]]
            node = _subtree(variables, "params", path)
            for name, value in list(node.items()):
                if isinstance(value, QArray) or getattr(value, "ndim", 0) >= 2:
                    node[name] = float_weight(value, rule, self.mode)
        return variables

    def _rule_for(self, module: nn.Module):
        kind = next((k for t, k in _KINDS.items() if type(module) is t), None)
        if kind is None:
            return None
        path = ".".join(module.path)
        match = self.recipe.match(path, kind)
        if match is not None:
            self.matched[path] = match[0]
            if isinstance(module, _OWN_CODE) and not match[1].skip:
                self.own_code.add(path)
        return None if match is None or match[1].skip else match[1]

    def _intercept(self, next_fun, args, kwargs, context):
        if context.method_name not in ("__call__", "attend"):
            return next_fun(*args, **kwargs)
        rule = self._rule_for(context.module)
        if rule is None:
            return next_fun(*args, **kwargs)
        module, mode = context.module, self.mode
        if mode == "calibrate":
            if rule.act is not None:
                shape = calibration.stat_shape(rule.act, args[0].shape[-1])
                module.sow("quant_stats", "act", args[0], init_fn=lambda: calibration.init_stats(shape),
                           reduce_fn=lambda stats, x: calibration.observe(stats, x, rule.observer, rule.ema_decay, rule.percentile))  # fmt: skip
            return next_fun(*args, **kwargs)
        scale = zp = None
        if rule.act is not None and rule.static_act:
            if not module.has_variable("quant_scales", "act_scale"):
                raise ValueError(f"{'.'.join(module.path)}: no static activation scale; calibrate and call quantize_params first")
            scale = calibration.broadcast_static(module.get_variable("quant_scales", "act_scale"), args[0].ndim)
            if module.has_variable("quant_scales", "act_zero_point"):
                zp = calibration.broadcast_static(module.get_variable("quant_scales", "act_zero_point"), args[0].ndim)
        if isinstance(module, _OWN_CODE):  # weights were handled in the tree; quantize the input, run its code
            x = quantize_activation(args[0], rule, "ptq" if mode == "serve" else mode, scale, zp)
            return next_fun(x, *args[1:], **kwargs)
        if isinstance(module, nn.Dense):
            x = quantize_activation(args[0], rule, mode, scale, zp)
            w = quantize_weight(module.get_variable("params", "kernel"), rule, mode)
            y = qo.dot_general(x, w, (((args[0].ndim - 1,), (0,)), ((), ())), mode=matmul_mode(mode))
            bias = module.get_variable("params", "bias") if module.use_bias else None
            return y if bias is None else y + bias
        table = module.get_variable("params", "embedding")
        if context.method_name == "attend":
            x = quantize_activation(args[0], rule, mode, scale, zp)
            return qo.dot_general(x, quantize_weight(table, rule, mode), (((x.ndim - 1,), (1,)), ((), ())), mode=matmul_mode(mode))
        w = quantize_weight(table, rule, "ptq")  # lookups read float rows
        return jnp.take(w, args[0], axis=0)

    def quantize_params(self, variables, *example_args, **example_kwargs):
        """Pack every matched weight into a QArray (ptq/serve); finds the ops by tracing one example call."""
        self._trace(variables, example_args, example_kwargs)
        variables = unfreeze(variables)
        for path, rule_index in self.matched.items():
            rule = self.recipe.rules[rule_index]
            if rule.skip:
                continue
            if rule.weight is not None:
                node = _subtree(variables, "params", path)
                for name, value in list(node.items()):
                    if getattr(value, "ndim", 0) >= 2 and not isinstance(value, QArray):
                        node[name] = quantize(value, rule.weight)
            if rule.act is not None and rule.static_act:
                try:
                    stats = _subtree(variables, "quant_stats", path)["act"]
                except KeyError:
                    raise ValueError(f"{path}: static_act needs calibration statistics (the 'quant_stats' collection)") from None
                scale, zp = calibration.scale_from_stats(stats, rule.act)
                out = _subtree(variables, "quant_scales", path, create=True)
                out["act_scale"] = scale
                if zp is not None:
                    out["act_zero_point"] = zp
        self.recipe.report_unused(set(self.matched.values()))
        return variables

    def _record(self, next_fun, args, kwargs, context):
        if context.method_name in ("__call__", "attend"):
            self._rule_for(context.module)
        return next_fun(*args, **kwargs)


def _subtree(variables: dict, collection: str, path: str, create: bool = False) -> dict:
    node = variables.setdefault(collection, {}) if create else variables[collection]
    for key in path.split("."):
        node = node.setdefault(key, {}) if create else node[key]
    return node

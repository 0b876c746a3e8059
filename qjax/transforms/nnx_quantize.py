"""`quantize` for Flax NNX models: replace matched submodules with their quantized counterparts."""

from __future__ import annotations

import re

from flax import nnx

from qjax.layers import AttentionOp, KVCache
from qjax.transforms.apply import matmul_mode
from qjax.transforms.intercept import QIntercepted
from qjax.transforms.nnx_modules import QConv, QDotGeneral, QEinsum, QEmbed, QLinear, QuantizedOp, set_child
from qjax.transforms.recipe import Recipe, Rule

# Flax module type -> (op kind, quantized replacement)
_REPLACEMENTS = {
    nnx.Linear: ("dot_general", QLinear),
    nnx.Einsum: ("einsum", QEinsum),
    nnx.Conv: ("conv", QConv),
    nnx.Embed: ("embed", QEmbed),
}


def path_str(path) -> str:
    return ".".join(str(p) for p in path)


def quantize_nnx(model: nnx.Module, recipe: Recipe, mode: str) -> nnx.Module:
    """A copy of `model` with every op matched by `recipe` quantized in `mode`; the original is untouched."""
    model = nnx.clone(model)
    used: set[int] = set()
    modules = list(nnx.iter_modules(model))
    quantized = [p for p, m in modules if isinstance(m, QuantizedOp)]
    for path, module in modules:
        name = path_str(path)
        if any(path[: len(q)] == q and len(path) > len(q) for q in quantized):
            continue  # inside a quantized op (e.g. the module an interceptor wraps): its owner handles it
        if isinstance(module, QuantizedOp):  # already quantized: the new recipe's rule (if any) applies
            match = recipe.match(name, module.op_kind)
            if match is None:
                module.convert(mode)
            else:
                used.add(match[0])
                module.set_rule(match[1], mode)
            continue
        if isinstance(module, (AttentionOp, KVCache)):
            match = recipe.match(name, "attention")
            if match is not None:
                used.add(match[0])
                _configure_attention(module, match[1], mode)
            continue
        kind_and_cls = next(((k, c) for t, (k, c) in _REPLACEMENTS.items() if type(module) is t), None)
        if kind_and_cls is not None:
            kind, cls = kind_and_cls
            match = recipe.match(name, kind)
            if match is None:
                continue
            used.add(match[0])
            if not match[1].skip:
                replacement = cls(module, match[1], mode, name)
                if not path:  # the model is itself a single quantizable module
                    recipe.report_unused(used)
                    return replacement
                set_child(model, path, replacement)
        elif hasattr(module, "dot_general") and callable(module.dot_general) and not isinstance(module.dot_general, QDotGeneral):
            match = recipe.match(name, "dot_general")
            if match is None:
                continue
            used.add(match[0])
            if not match[1].skip:
                features = getattr(module, "in_features", None)
                hook = QDotGeneral(match[1], mode, name, features if isinstance(features, int) else None)
                module.dot_general = nnx.data(hook)  # a module with state, where a plain function stood
        elif path and _is_custom_leaf_with_weights(module):
            match = recipe.match(name, "dot_general") or recipe.match(name, "einsum")
            if match is None:
                continue
            used.add(match[0])
            if not match[1].skip:
                set_child(model, path, QIntercepted(module, match[1], mode, name))
    recipe.report_unused(used)
    return model


def _is_custom_leaf_with_weights(module: nnx.Module) -> bool:
    """A user-defined module with its own ≥2-D parameters and no submodules: a candidate for interception."""
    if type(module).__module__.startswith(("flax.", "qjax.")):
        return False
    if len(list(nnx.iter_modules(module))) != 1:
        return False
    return any(v.get_value().ndim >= 2 for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


def _configure_attention(module, rule, mode: str) -> None:
    if rule.skip:
        return
    if isinstance(module, AttentionOp):
        module.configure(rule.q, rule.k, rule.v, rule.p, rule.p_scale, rule.k_smooth, matmul_mode(mode))
    elif rule.kv is not None and module.spec != rule.kv:
        module.set_spec(rule.kv)


def float_op(module: nnx.Module, path: str) -> QuantizedOp:
    """`module` as a quantized op that quantizes nothing yet (a rule with no specs), so that methods can
    attach input transforms or weights before a `quantize` step sets the real rule."""
    if isinstance(module, QuantizedOp):
        return module
    cls = next((c for t, (_, c) in _REPLACEMENTS.items() if type(module) is t), None)
    if cls is None:
        raise TypeError(f"{path}: a {type(module).__name__} cannot hold an input transform (Linear/Einsum/Conv/Embed can)")
    return cls(module, Rule(re.escape(path)), "qat", path)


def quantized_ops(model: nnx.Module) -> dict[str, QuantizedOp]:
    """Path → quantized op, for inspection (e.g. per-layer error plots)."""
    return {path_str(p): m for p, m in nnx.iter_modules(model) if isinstance(m, QuantizedOp)}

"""qjax.transforms: turn a Flax model into a QAT / calibrating / PTQ / serving model with a recipe."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
from flax import nnx

from qjax.transforms.checkpoint import restore_model, save_model
from qjax.transforms.intercept import QIntercepted
from qjax.transforms.linen import QuantizedLinen
from qjax.transforms.nnx_modules import (
    LearnedScale,
    OnlineTransform,
    QConv,
    QDotGeneral,
    QEinsum,
    QEmbed,
    QLinear,
    QuantizedOp,
    QuantizedWeight,
    QuantStat,
    StaticScale,
    quantize_gradient,
)
from qjax.transforms.nnx_quantize import float_op, quantize_nnx, quantized_ops
from qjax.transforms.recipe import MODES, Recipe, Rule, check_mode


def quantize(model, recipe: Recipe | list[Rule], mode: str = "qat"):
    """Quantize a Flax model with `recipe` in `mode` ("qat", "calibrate", "ptq", "serve").

    NNX modules: returns a new module with the same call signature (the input is not modified); an
    already-quantized model is moved to the new mode (calibrate → ptq freezes static scales, qat → ptq
    packs the weights, using learned LSQ scales where present). Linen modules: returns a
    `QuantizedLinen` wrapper with `init`/`apply`/`quantize_params`.
    """
    check_mode(mode)
    if not isinstance(recipe, Recipe):
        recipe = Recipe(tuple(recipe))
    if isinstance(model, nnx.Module):
        return quantize_nnx(model, recipe, mode)
    if isinstance(model, nn.Module):
        return QuantizedLinen(model, recipe, mode)
    raise TypeError(f"quantize expects a Flax NNX or Linen module, got {type(model).__name__}")


def param_bytes(model: nnx.Module, *filters) -> int:
    """Bytes held by a model's parameters, packed weights (QArrays count their packed size) and stored
    online transforms (rotation blocks, Hadamard signs); or by the variables of the given NNX filters."""
    state = nnx.state(model, *(filters or (nnx.Param, QuantizedWeight, OnlineTransform)))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))


__all__ = [
    "MODES", "LearnedScale", "OnlineTransform", "float_op", "QConv", "QDotGeneral", "QEinsum", "QEmbed", "QIntercepted", "QLinear", "QuantStat", "QuantizedLinen",
    "QuantizedOp", "QuantizedWeight", "Recipe", "Rule", "StaticScale", "param_bytes", "quantize", "quantize_gradient",
    "quantized_ops", "restore_model", "save_model",
]  # fmt: skip

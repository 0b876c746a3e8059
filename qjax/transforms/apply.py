"""What a rule does to one operand in one mode: pure functions shared by the NNX and Linen transforms."""

from __future__ import annotations

import jax

from qjax.numerics import QArray, fake_quant, lsq_fake_quant, quantize
from qjax.transforms.recipe import Rule


def _ste_rule(rule: Rule) -> str:
    return "ste" if rule.gradient == "lsq" else rule.gradient


def quantize_activation(x: jax.Array, rule: Rule, mode: str, scale=None, zero_point=None):
    """The input activation as the op should see it: float (fake-quantized) or a QArray (serve)."""
    if rule.act is None or mode == "calibrate":
        return x
    if mode == "serve":
        return quantize(x, rule.act, scale=scale, zero_point=zero_point)
    return fake_quant(x, rule.act, gradient=_ste_rule(rule), scale=scale, zero_point=zero_point)


def quantize_weight(w, rule: Rule, mode: str, learned_scale: jax.Array | None = None):
    """The weight as the op should see it: float (fake-quantized / dequantized) or a QArray (serve)."""
    if isinstance(w, QArray):
        return w if mode == "serve" else w.dequantize()
    if rule.weight is None or mode == "calibrate":
        return w
    if learned_scale is not None:
        return lsq_fake_quant(w, learned_scale, rule.weight)
    if mode == "serve":
        return quantize(w, rule.weight)
    return fake_quant(w, rule.weight, gradient=_ste_rule(rule))


def float_weight(w, rule: Rule, mode: str):
    """A weight for code that computes in float: packed QArrays dequantized, float weights
    fake-quantized (straight-through) except while calibrating."""
    return quantize_weight(w, rule, "calibrate" if mode == "calibrate" else "qat")


def matmul_mode(mode: str) -> str:
    """qjax.ops path for a transform mode: integer arithmetic only when serving."""
    return "int" if mode == "serve" else "fake"

"""qjax: quantization-aware experimentation for JAX and Flax."""

from qjax import layers, numerics, ops, transforms
from qjax.numerics import QArray, QuantSpec, fake_quant, per_axis, per_block, per_channel, per_group, per_tensor, per_token
from qjax.transforms import Recipe, Rule, param_bytes, quantize, restore_model, save_model

__version__ = "0.1.0"
__all__ = [
    "QArray", "QuantSpec", "Recipe", "Rule", "fake_quant", "layers", "numerics", "ops", "param_bytes", "per_axis", "per_block",
    "per_channel", "per_group", "per_tensor", "per_token", "quantize", "restore_model", "save_model", "transforms",
]  # fmt: skip

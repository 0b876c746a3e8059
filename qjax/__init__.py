"""qjax: quantization-aware experimentation for JAX and Flax."""

from qjax import layers, numerics, ops, transforms
from qjax.numerics import QArray, QuantSpec, fake_quant, per_axis, per_block, per_channel, per_group, per_tensor, per_token
from qjax.transforms import Recipe, Rule, param_bytes, quantize, restore_model, save_model

__version__ = "0.1.0"

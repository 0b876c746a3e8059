"""qjax.ops: quantized dot_general / einsum / conv as pure functions, usable from any JAX code."""

from qjax.ops.attention import attention, causal_mask
from qjax.ops.conv import conv_general_dilated
from qjax.ops.dot_general import dot_general, einsum, integer_dot_general, outlier_features

__all__ = ["attention", "causal_mask", "conv_general_dilated", "dot_general", "einsum", "integer_dot_general",
           "outlier_features"]

"""Quantized `conv_general_dilated`: fake-quant path and integer path (int8×int8→int32 convolution)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.numerics import QArray, QuantSpec
from qjax.ops.dot_general import Mode, _fake_operand, _float_dtype, _int8_codes, _int_operand, _integer_ok


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    lhs_spec: QuantSpec | None = None,
    rhs_spec: QuantSpec | None = None,
    mode: Mode = "fake",
    lhs_key: jax.Array | None = None,
    rhs_key: jax.Array | None = None,
    gradient: str = "ste",
) -> jax.Array:
    """`jax.lax.conv_general_dilated` with quantized operands.

    The integer path needs symmetric operands whose scales are constant over the contraction
    (input features and window): lhs per-tensor or per-batch-element, rhs per-tensor or per output
    feature. Other layouts raise; use mode="fake" for them.
    """
    out_dtype = preferred_element_type or _float_dtype(lhs, rhs)
    conv = lambda a, b, **kw: jax.lax.conv_general_dilated(  # noqa: E731
        a, b, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, **kw,
    )  # fmt: skip
    if mode == "fake":
        a = _fake_operand(lhs, lhs_spec, lhs_key, gradient, "lhs")
        b = _fake_operand(rhs, rhs_spec, rhs_key, gradient, "rhs")
        return conv(a, b, preferred_element_type=out_dtype)
    if mode != "int":
        raise ValueError(f"mode must be 'fake' or 'int', got {mode!r}")
    a = _int_operand(lhs, lhs_spec, lhs_key)
    b = _int_operand(rhs, rhs_spec, rhs_key)
    if not (isinstance(a, QArray) and isinstance(b, QArray) and _integer_ok(a) and _integer_ok(b)):
        a = a.dequantize(out_dtype) if isinstance(a, QArray) else a
        b = b.dequantize(out_dtype) if isinstance(b, QArray) else b
        return conv(a, b, preferred_element_type=out_dtype)

    dn = jax.lax.conv_dimension_numbers(a.shape, b.shape, dimension_numbers)
    lhs_batch, rhs_out, out_batch, out_feat = dn.lhs_spec[0], dn.rhs_spec[0], dn.out_spec[0], dn.out_spec[1]
    _check_conv_scales(a, keep=lhs_batch, name="lhs")
    _check_conv_scales(b, keep=rhs_out, name="rhs")
    a_codes, _ = _int8_codes(a)
    b_codes, _ = _int8_codes(b)
    a_codes = a_codes[tuple(slice(0, d) for d in a.shape)]
    b_codes = b_codes[tuple(slice(0, d) for d in b.shape)]
    acc = conv(a_codes, b_codes, preferred_element_type=jnp.int32)
    sa = _per_index(a, lhs_batch)
    sb = _per_index(b, rhs_out)
    shape_a = [1] * acc.ndim
    shape_a[out_batch] = -1
    shape_b = [1] * acc.ndim
    shape_b[out_feat] = -1
    return (acc.astype(jnp.float32) * sa.reshape(shape_a) * sb.reshape(shape_b)).astype(out_dtype)


def _check_conv_scales(q: QArray, keep: int, name: str) -> None:
    if q.zero_point is not None or not q.format.signed and q.format.bits == 8:
        raise NotImplementedError(f"integer conv needs a symmetric signed {name}; use mode='fake'")
    for axis, n in enumerate(q.scale_shape):
        if axis != keep and n != 1:
            raise NotImplementedError(
                f"integer conv: {name} scale varies along axis {axis} (part of the contraction); "
                "use per-tensor or per-batch/per-output-feature scales, or mode='fake'"
            )


def _per_index(q: QArray, axis: int) -> jax.Array:
    s = q.scale.astype(jnp.float32).reshape(-1)
    t = q.tiles[axis]
    return jnp.repeat(s, t, total_repeat_length=s.shape[0] * t)[: q.shape[axis]]

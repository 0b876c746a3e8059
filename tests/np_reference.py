"""Independent numpy fake quantization used as the reference in transform tests.

Scales and x/scale are computed in float32 (as any float32 implementation does) so that values lying
within float32 rounding of a .5 tie round the same way; everything after rounding is float64.
"""

import ml_dtypes
import numpy as np


def _div32(x, s):
    return (np.asarray(x, np.float32) / np.asarray(s, np.float32)).astype(np.float64)


def int_symmetric(x: np.ndarray, bits: int, axis_keep: tuple[int, ...] = (), group: tuple[int, int] | None = None):
    """Symmetric abs-max int fake quant. axis_keep: axes with one scale per index; group: (axis, size)."""
    x = np.asarray(x, np.float64)
    qmax = 2 ** (bits - 1) - 1
    if group is not None:
        axis, size = group
        xm = np.moveaxis(x, axis, -1)
        n = xm.shape[-1]
        pad = (-n) % size
        xp = np.concatenate([xm, np.zeros(xm.shape[:-1] + (pad,))], -1).reshape(*xm.shape[:-1], -1, size)
        s = (np.abs(xp).max(-1, keepdims=True) / qmax).astype(np.float32)
        s = np.where(s == 0, 1, s)
        q = np.clip(np.round(_div32(xp, s)), -qmax - 1, qmax) * s
        return np.moveaxis(q.reshape(*xm.shape[:-1], -1)[..., :n], -1, axis)
    red = tuple(a for a in range(x.ndim) if a not in [k % x.ndim for k in axis_keep])
    s = (np.abs(x).max(axis=red, keepdims=True) / qmax).astype(np.float32)
    s = np.where(s == 0, 1, s)
    return np.clip(np.round(_div32(x, s)), -qmax - 1, qmax) * s.astype(np.float64)


def per_token_int(x, bits):
    return int_symmetric(x, bits, axis_keep=tuple(range(x.ndim - 1)))


def fp8_e4m3(x, axis_keep=()):
    x = np.asarray(x, np.float64)
    red = tuple(a for a in range(x.ndim) if a not in [k % x.ndim for k in axis_keep])
    s = (np.abs(x).max(axis=red, keepdims=True) / 448.0).astype(np.float32)
    v = np.clip(_div32(x, s), -448, 448).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return v * s.astype(np.float64)

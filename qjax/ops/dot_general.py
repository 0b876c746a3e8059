"""Quantized `dot_general` and `einsum`: drop-ins for `jax.lax.dot_general` / `jnp.einsum`.

Two paths share one set of specs:
  - fake ("fake"): quantize→dequantize each operand (differentiable, straight-through), float dot.
  - integer ("int"): int8×int8→int32 dots (`preferred_element_type=jnp.int32`) over blocks of the
    contraction axis within which both operands' scales are constant, then float rescale and sum
    over blocks; zero points are handled with exact int32 correction terms.
Operands may be plain arrays (quantized on the fly with `lhs_spec`/`rhs_spec`) or ready `QArray`s
(e.g. PTQ weights). An operand with neither stays in float (weight-only / activation-only schemes).

`outlier_threshold=t` adds LLM.int8()'s mixed-precision decomposition (Dettmers et al. 2022): the lhs
(activation) features j with max |x_j| ≥ t over all its non-contracting elements are contracted in float,
the rest through either path above. The set is recomputed every call as a mask (static shapes, jit-safe).
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from qjax.kernels.common import on_gpu
from qjax.numerics import QArray, QuantSpec, fake_quant, quantize

Mode = Literal["fake", "int"]
DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


def dot_general(
    lhs,
    rhs,
    dimension_numbers: DimensionNumbers,
    precision=None,
    preferred_element_type=None,
    *,
    lhs_spec: QuantSpec | None = None,
    rhs_spec: QuantSpec | None = None,
    mode: Mode = "fake",
    lhs_key: jax.Array | None = None,
    rhs_key: jax.Array | None = None,
    gradient: str = "ste",
    use_kernels: bool | None = None,
    outlier_threshold: float | None = None,
) -> jax.Array:
    """`jax.lax.dot_general` with quantized operands (see the module docstring for the two paths)."""
    if mode not in ("fake", "int"):
        raise ValueError(f"mode must be 'fake' or 'int', got {mode!r}")
    if outlier_threshold is not None:
        quant = dict(lhs_spec=lhs_spec, rhs_spec=rhs_spec, mode=mode, lhs_key=lhs_key, rhs_key=rhs_key,
                     gradient=gradient, use_kernels=use_kernels)  # fmt: skip
        return _decomposed(lhs, rhs, dimension_numbers, outlier_threshold, precision, preferred_element_type, quant)
    out_dtype = preferred_element_type or _float_dtype(lhs, rhs)
    if mode == "fake":
        a = _fake_operand(lhs, lhs_spec, lhs_key, gradient, "lhs")
        b = _fake_operand(rhs, rhs_spec, rhs_key, gradient, "rhs")
        return jax.lax.dot_general(a, b, dimension_numbers, precision, preferred_element_type=out_dtype)
    a = _int_operand(lhs, lhs_spec, lhs_key)
    b = _int_operand(rhs, rhs_spec, rhs_key)
    if isinstance(a, QArray) and isinstance(b, QArray) and _integer_ok(a) and _integer_ok(b):
        return integer_dot_general(a, b, dimension_numbers, out_dtype, use_kernels)
    # One side float (weight-only W4A16-style, or a non-integer format): the Pallas weight-only GEMM for
    # its layout on GPU, else dequantize and a float dot.
    if not isinstance(a, QArray) and isinstance(b, QArray) and use_kernels_default(use_kernels):
        fast = _weight_only_kernel(a, b, dimension_numbers, out_dtype)
        if fast is not None:
            return fast
    a = a.dequantize(out_dtype) if isinstance(a, QArray) else a
    b = b.dequantize(out_dtype) if isinstance(b, QArray) else b
    return jax.lax.dot_general(a, b, dimension_numbers, precision, preferred_element_type=out_dtype)


# ---- LLM.int8() outlier decomposition ------------------------------------------------------------


def outlier_features(x: jax.Array, threshold: float = 6.0, axes: Sequence[int] = (-1,)) -> jax.Array:
    """Boolean mask over x's feature `axes` (in that order): max |x| over all other axes ≥ threshold."""
    axes = tuple(a % x.ndim for a in axes)
    amax = jnp.max(jnp.abs(x), axis=tuple(a for a in range(x.ndim) if a not in axes))  # axes in sorted order
    return jnp.transpose(amax, [sorted(axes).index(a) for a in axes]) >= threshold


def _decomposed(lhs, rhs, dimension_numbers: DimensionNumbers, threshold: float, precision, preferred_element_type,
                quant: dict) -> jax.Array:  # fmt: skip
    """LLM.int8(): float dot over the lhs outlier features + quantized dot over the rest, via masks.

    The quantized part sees x with the outlier features zeroed and, for a float rhs, the weight with the
    matching rows zeroed (so its scales ignore them), and the float part uses the exact float rows. A packed
    QArray rhs keeps its scales (the zeroed activations contribute exactly 0 through them), and its outlier
    rows come from its dequantized values: the float rows are gone, as in bitsandbytes' Linear8bitLt with
    `has_fp16_weights=False`; a deployment that kept them in fp16 would pass the float weight instead.
    """
    if isinstance(lhs, QArray):
        raise ValueError("outlier_threshold needs a float lhs (the activations) to find outliers in, not a QArray")
    (lc, rc), _ = dimension_numbers
    lc, rc = tuple(a % lhs.ndim for a in lc), tuple(a % rhs.ndim for a in rc)
    mask = outlier_features(lhs, threshold, lc)
    lmask, rmask = _place(mask, lc, lhs.ndim), _place(mask, rc, rhs.ndim)
    w = rhs.dequantize(lhs.dtype) if isinstance(rhs, QArray) else rhs
    x_regular = jnp.where(lmask, 0.0, lhs)
    w_regular = rhs if isinstance(rhs, QArray) else jnp.where(rmask, 0.0, rhs)
    regular = dot_general(x_regular, w_regular, dimension_numbers, precision, preferred_element_type, **quant)
    x_outlier = jnp.where(lmask, lhs, 0.0)
    outliers = jax.lax.dot_general(x_outlier, w, dimension_numbers, precision, preferred_element_type=regular.dtype)
    return regular + outliers


def _place(mask: jax.Array, axes: tuple[int, ...], ndim: int) -> jax.Array:
    """Lay a mask over `axes` (in that order) out to broadcast against a rank-`ndim` operand."""
    shape = [mask.shape[axes.index(a)] if a in axes else 1 for a in range(ndim)]
    return jnp.transpose(mask, np.argsort(axes)).reshape(shape)


def _float_dtype(*xs):
    """Output dtype: that of the float operands (activations) if any, else of the QArrays' sources."""
    plain = [x.dtype for x in xs if not isinstance(x, QArray) and jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.result_type(*(plain or [jnp.dtype(x.dtype) for x in xs if isinstance(x, QArray)] or [jnp.float32]))


def _fake_operand(x, spec, key, gradient, name):
    if isinstance(x, QArray):
        if spec is not None:
            raise ValueError(f"{name} is already a QArray; do not pass {name}_spec as well")
        return x.dequantize()
    if spec is None:
        return x
    return fake_quant(x, spec, key=key, gradient=gradient)


def _int_operand(x, spec, key):
    if isinstance(x, QArray) or spec is None:
        return x
    return quantize(x, spec, key=key)


def _integer_ok(q: QArray) -> bool:
    return q.format.kind == "int" and q.format.bits <= 8


# ---- the integer path -----------------------------------------------------------------------------


def use_kernels_default(use_kernels: bool | None) -> bool:
    """Pallas kernels are used on GPU unless told otherwise (True forces them: interpret mode on CPU)."""
    return on_gpu() if use_kernels is None else use_kernels


def integer_dot_general(lhs: QArray, rhs: QArray, dimension_numbers: DimensionNumbers, out_dtype=jnp.float32,
                        use_kernels: bool | None = None) -> jax.Array:  # fmt: skip
    """Exact integer accumulation of two integer QArrays, rescaled in float32.

    Equals `dot_general(lhs.dequantize(), rhs.dequantize())` up to float32 rounding of the rescale.
    The common W8A8 layout goes to the Pallas GEMM when `use_kernels` (default: on GPU).
    """
    (lc, rc), (lb, rb) = [[tuple(a % q.ndim for a in axes) for axes, q in zip(pair, (lhs, rhs))] for pair in dimension_numbers]
    if use_kernels_default(use_kernels):
        fast = _gemm_kernel(lhs, rhs, lc, rc, lb, rb, out_dtype)
        if fast is not None:
            return fast
    lf = tuple(a for a in range(lhs.ndim) if a not in lc and a not in lb)
    rf = tuple(a for a in range(rhs.ndim) if a not in rc and a not in rb)
    for i, j in zip(lc, rc):
        if lhs.shape[i] != rhs.shape[j]:
            raise ValueError(f"contracting dims differ: lhs axis {i} has {lhs.shape[i]}, rhs axis {j} has {rhs.shape[j]}")

    # Within a block of g contraction elements both operands' scales must be constant.
    grouped = [(i, j) for i, j in zip(lc, rc) if _n_tiles(lhs, i) > 1 or _n_tiles(rhs, j) > 1]
    if len(grouped) > 1:
        raise NotImplementedError("integer dot: at most one contracting axis may carry sub-channel groups")
    # Put the grouped contracting axis last so that flattening keeps its blocks contiguous.
    pairs = [p for p in zip(lc, rc) if p not in grouped] + grouped
    lc, rc = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    if grouped:
        i, j = grouped[0]
        constrained = [t for q, a in ((lhs, i), (rhs, j)) if _n_tiles(q, a) > 1 for t in [q.tiles[a]]]
        g = math.gcd(*constrained)
        kl = lhs.padded_shape[i] if _n_tiles(lhs, i) > 1 else lhs.shape[i]
        kr = rhs.padded_shape[j] if _n_tiles(rhs, j) > 1 else rhs.shape[j]
        k_last = max(kl, kr)
    else:
        g, k_last = None, None

    a_vals, a_scale, a_zp = _canonical(lhs, lb, lf, lc, k_last, g, contract_first=False)
    b_vals, b_scale, b_zp = _canonical(rhs, rb, rf, rc, k_last, g, contract_first=True)
    # a: (B, M, G, g) int8, scales (B, M, G); b: (B, G, g, N) int8, scales (B, G, N)
    acc = jax.lax.dot_general(
        a_vals, b_vals, (((3,), (2,)), ((0, 2), (0, 1))), preferred_element_type=jnp.int32
    )  # (B, G, M, N)
    block = a_vals.shape[3]
    if b_zp is not None:
        acc = acc - jnp.sum(a_vals, axis=3, dtype=jnp.int32).transpose(0, 2, 1)[..., None] * b_zp[:, :, None, :]
    if a_zp is not None:
        acc = acc - a_zp.transpose(0, 2, 1)[..., None] * jnp.sum(b_vals, axis=2, dtype=jnp.int32)[:, :, None, :]
    if a_zp is not None and b_zp is not None:
        acc = acc + block * a_zp.transpose(0, 2, 1)[..., None] * b_zp[:, :, None, :]
    scaled = acc.astype(jnp.float32) * a_scale.transpose(0, 2, 1)[..., None] * b_scale[:, :, None, :]
    out = jnp.sum(scaled, axis=1)  # (B, M, N)
    out_shape = [lhs.shape[a] for a in lb] + [lhs.shape[a] for a in lf] + [rhs.shape[a] for a in rf]
    return out.reshape(out_shape).astype(out_dtype)


def _gemm_kernel(lhs: QArray, rhs: QArray, lc, rc, lb, rb, out_dtype):
    """The Pallas W8A8 GEMM for the common case — (..., K) int8 per-token/per-tensor activations × (K, N)
    int8 per-channel or per-group weights, symmetric — or None when the layout is not that case."""
    int8 = lambda q: q.format.kind == "int" and q.format.bits == 8 and q.format.signed and q.zero_point is None  # noqa: E731
    if lb or rb or lc != (lhs.ndim - 1,) or rhs.ndim != 2 or rc != (0,) or not (int8(lhs) and int8(rhs)):
        return None
    k, n = rhs.shape
    if lhs.tiles[-1] != k or any(t != 1 for t in lhs.tiles[:-1]) and any(t != d for t, d in zip(lhs.tiles[:-1], lhs.shape[:-1])):
        return None
    group = None if rhs.tiles[0] == k else rhs.tiles[0]
    if rhs.tiles[1] != 1 or (group is not None and (group < 16 or group & (group - 1) or k % group)):
        return None
    from qjax.kernels.gemm import w8a8_matmul  # kernels sit below ops; imported only on GPU

    m = math.prod(lhs.shape[:-1])
    a = lhs.values[tuple(slice(0, d) for d in lhs.shape)].reshape(m, k)
    sa = jnp.broadcast_to(lhs.scale.astype(jnp.float32), lhs.shape[:-1] + (1,)).reshape(m)
    w = rhs.values[:k, :n].T  # K-major for the int8 MMA; PTQ weights could be stored this way once
    sw = rhs.scale.astype(jnp.float32)[:, :n].T.reshape(n, -1)
    out = w8a8_matmul(a, sa, w, sw if group else sw[:, 0], out_dtype=out_dtype, group_size=group)
    return out.reshape(*lhs.shape[:-1], n)


def _weight_only_kernel(x: jax.Array, w: QArray, dimension_numbers, out_dtype):
    """The Pallas weight-only GEMM for (..., K) float activations × a (K, N) symmetric int8/int4 weight
    with per-channel or power-of-two group scales along K, or None when the layout is not that case.
    The weight is laid out K-major (and int4 repacked in the kernel's layout) per call."""
    (lc, rc), (lb, rb) = dimension_numbers
    if lb or rb or tuple(a % x.ndim for a in lc) != (x.ndim - 1,) or w.ndim != 2 or tuple(rc) != (0,):
        return None
    fmt = w.format
    if fmt.kind != "int" or not fmt.signed or fmt.bits not in (4, 8) or w.zero_point is not None or w.tiles[1] != 1:
        return None
    k, n = w.shape
    g = w.tiles[0]
    if g == k:  # per channel: any power-of-two group dividing K with the scale repeated stands for it
        g = math.gcd(k, 128)
    if g < 16 or g & (g - 1) or k % g:
        return None
    from qjax.kernels.gemm import pack_int4_kernel_layout, weight_only_matmul  # kernels sit below ops

    scale = w.scale.astype(jnp.float32)  # (K / tile, N)
    scale = jnp.repeat(scale, k // g // scale.shape[0], axis=0).T  # (N, K / g)
    codes = w.codes()[:k, :n].astype(jnp.int8).T  # (N, K), K-major
    block_k = max(g, 128)
    if fmt.bits == 4:
        kp = -(-k // block_k) * block_k
        codes = pack_int4_kernel_layout(jnp.pad(codes, ((0, 0), (0, kp - k))), block_k)
    x2 = x.reshape(-1, k)
    out = weight_only_matmul(x2, codes, scale, bits=fmt.bits, group_size=g, block_k=block_k)
    return out.reshape(*x.shape[:-1], n).astype(out_dtype)


def _n_tiles(q: QArray, axis: int) -> int:
    return q.scale_shape[axis]


def _int8_codes(q: QArray) -> tuple[jax.Array, jax.Array | None]:
    """Codes as int8 and zero points as int32; uint8 is recentred by -128 (and its zero point with it)."""
    codes = q.codes()
    zp = None if q.zero_point is None else q.zero_point.astype(jnp.int32)
    if q.format.signed or q.format.bits < 8:
        return codes.astype(jnp.int8), zp
    centred = (codes.astype(jnp.int32) - 128).astype(jnp.int8)
    return centred, (jnp.full(q.scale_shape, -128, jnp.int32) if zp is None else zp - 128)


def _canonical(q: QArray, batch, free, contract, k_last, g, contract_first):
    """Lay q out as (B, M, G, g) [lhs] or (B, G, g, N) [rhs], with per-(B, M|N, G) scales and zero points."""
    codes, zp = _int8_codes(q)
    scale = q.scale.astype(jnp.float32)

    def expand(arr, axis, length_out, per_block):
        """Map a per-tile array along `axis` to per-element (free/batch) or per-block (contract) values."""
        t, n = q.tiles[axis], arr.shape[axis]
        if per_block is None:
            return jnp.repeat(arr, t, axis=axis, total_repeat_length=n * t)[_take(arr.ndim, axis, length_out)]
        idx = np.minimum(np.arange(length_out) * per_block // t, n - 1)
        return jnp.take(arr, idx, axis=axis)

    # Values: slice batch/free axes to the true shape; pad contracting axes to a common length.
    vals = codes[tuple(slice(0, q.shape[a]) if a in batch or a in free else slice(None) for a in range(q.ndim))]
    pads = [(0, 0)] * q.ndim
    for a in contract:
        target = q.shape[a] if (k_last is None or a != contract[-1]) else k_last
        vals = vals[_take(q.ndim, a, min(target, vals.shape[a]))]
        pads[a] = (0, target - vals.shape[a])
    vals = jnp.pad(vals, pads)  # zero fill is exact: the other operand is zero there after its zero point

    def per_axis_params(arr):
        for a in batch + free:
            arr = expand(arr, a, q.shape[a], None)
        if g is not None:
            a = contract[-1]
            arr = expand(arr, a, vals.shape[a] // g, g)
        return arr

    scale = per_axis_params(scale)
    zp = None if zp is None else per_axis_params(zp)
    n_blocks = vals.shape[contract[-1]] // g if g is not None else 1
    block = math.prod(vals.shape[a] for a in contract) // n_blocks

    bsz = math.prod(q.shape[a] for a in batch)
    fsz = math.prod(q.shape[a] for a in free)
    # Contract axes other than the last have a single scale tile: move it to size-1 and drop it.
    order = batch + free + contract
    vals = vals.transpose(order).reshape(bsz, fsz, n_blocks, block)
    scale = _params_layout(scale, batch, free, contract, bsz, fsz, n_blocks)
    zp = None if zp is None else _params_layout(zp, batch, free, contract, bsz, fsz, n_blocks)
    if contract_first:
        return vals.transpose(0, 2, 3, 1), scale.transpose(0, 2, 1), None if zp is None else zp.transpose(0, 2, 1)
    return vals, scale, zp


def _params_layout(p, batch, free, contract, bsz, fsz, n_blocks):
    """(per-axis params) → (B, M, G): other contract axes have one tile and are squeezed out."""
    p = p.transpose(batch + free + contract)
    lead = p.shape[: len(batch) + len(free)]
    p = p.reshape(*lead, -1)  # contract axes: only the last can have more than one entry
    return jnp.broadcast_to(p.reshape(bsz, fsz, -1), (bsz, fsz, n_blocks))


def _take(ndim: int, axis: int, length: int):
    return tuple(slice(0, length) if a == axis else slice(None) for a in range(ndim))


# ---- einsum ---------------------------------------------------------------------------------------


def einsum(
    subscripts: str,
    lhs,
    rhs,
    *,
    lhs_spec: QuantSpec | None = None,
    rhs_spec: QuantSpec | None = None,
    mode: Mode = "fake",
    preferred_element_type=None,
    lhs_key: jax.Array | None = None,
    rhs_key: jax.Array | None = None,
    gradient: str = "ste",
    outlier_threshold: float | None = None,
) -> jax.Array:
    """Two-operand `jnp.einsum` with quantized operands, lowered to one quantized `dot_general`.

    Specs refer to the operands' own axes, so quantization is independent of how the einsum is lowered.
    """
    ins, out = _parse_einsum(subscripts, lhs.ndim, rhs.ndim)
    (l_in, r_in) = ins
    batch = [c for c in l_in if c in r_in and c in out]
    contract = [c for c in l_in if c in r_in and c not in out]
    for side, other, name in ((l_in, r_in, "lhs"), (r_in, l_in, "rhs")):
        lonely = [c for c in side if c not in other and c not in out]
        if lonely:
            raise NotImplementedError(f"einsum {subscripts!r}: {name} index {lonely} is summed alone; reduce it first")
    dims = (
        (tuple(l_in.index(c) for c in contract), tuple(r_in.index(c) for c in contract)),
        (tuple(l_in.index(c) for c in batch), tuple(r_in.index(c) for c in batch)),
    )
    y = dot_general(
        lhs, rhs, dims, preferred_element_type=preferred_element_type, lhs_spec=lhs_spec, rhs_spec=rhs_spec,
        mode=mode, lhs_key=lhs_key, rhs_key=rhs_key, gradient=gradient, outlier_threshold=outlier_threshold,
    )  # fmt: skip
    produced = batch + [c for c in l_in if c not in r_in] + [c for c in r_in if c not in l_in]
    return jnp.transpose(y, [produced.index(c) for c in out])


def _parse_einsum(subscripts: str, ndim_l: int, ndim_r: int) -> tuple[tuple[str, str], str]:
    s = subscripts.replace(" ", "")
    if "->" not in s:
        raise ValueError(f"einsum {subscripts!r}: qjax needs an explicit output ('ab,bc->ac')")
    lhs_rhs, out = s.split("->")
    parts = lhs_rhs.split(",")
    if len(parts) != 2:
        raise ValueError(f"einsum {subscripts!r}: exactly two operands are supported")
    if "..." in s:
        spare = [c for c in string.ascii_letters if c not in s]
        k_l = ndim_l - (len(parts[0]) - 3) if "..." in parts[0] else 0
        k_r = ndim_r - (len(parts[1]) - 3) if "..." in parts[1] else 0
        ell = "".join(spare[: max(k_l, k_r)])
        parts = [parts[0].replace("...", ell[len(ell) - k_l :]), parts[1].replace("...", ell[len(ell) - k_r :])]
        out = out.replace("...", ell)
    for p, nd, name in ((parts[0], ndim_l, "lhs"), (parts[1], ndim_r, "rhs")):
        if len(p) != nd:
            raise ValueError(f"einsum {subscripts!r}: {name} has rank {nd} but {len(p)} indices")
    return (parts[0], parts[1]), out

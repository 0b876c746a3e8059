"""Quantized Flax NNX modules that replace Linear / Einsum / Conv / Embed, and a `dot_general` hook.

Each holds the original parameters plus quantization state as NNX variables:
  - `QuantStat`: calibration statistics of the input activation (calibrate mode),
  - `StaticScale`: activation scale/zero point frozen from those statistics (ptq/serve, static_act),
  - `QuantizedWeight`: the packed `QArray` weight (ptq/serve),
  - `LearnedScale` (an `nnx.Param`): LSQ weight scales (qat with gradient="lsq"),
  - `OnlineTransform`: a linear map applied to the input before quantization (a Hadamard before
    down_proj, DuQuant's rotation), whose inverse the kernel already holds (`add_input_transform`).
The mode decides the arithmetic: qat = fake quant with STE/LSQ; calibrate = float forward + observers;
ptq = packed weights dequantized on the fly, activations fake-quantized (static or dynamic scales);
serve = integer path (int8×int8→int32; the Pallas kernels on GPU when available).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import qjax.ops as qo
from qjax.numerics import QArray, QuantSpec, fake_quant, init_lsq_scale, quantize
from qjax.transforms import calibration
from qjax.transforms.apply import matmul_mode, quantize_activation, quantize_weight
from qjax.transforms.recipe import Rule


class QuantStat(nnx.Variable):
    """Calibration statistics ({min, max, count}) of an activation."""


class StaticScale(nnx.Variable):
    """A frozen activation scale (and zero point) computed from calibration statistics."""


class QuantizedWeight(nnx.Variable):
    """A weight stored as a packed QArray."""


class LearnedScale(nnx.Param):
    """A learnable (LSQ) quantization scale; trained with the other parameters."""


class OnlineTransform(nnx.Variable):
    """A `qjax.numerics.linear_maps` map applied to an op's input at run time (stored, so counted in bytes)."""


# ---- gradient quantization ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def quantize_gradient(y: jax.Array, spec: QuantSpec) -> jax.Array:
    """Identity forward; the cotangent is fake-quantized with `spec` in the backward pass."""
    return y


def _qg_fwd(y, spec):
    return y, None


def _qg_bwd(spec, _, g):
    return (fake_quant(g, spec),)


quantize_gradient.defvjp(_qg_fwd, _qg_bwd)


# ---- shared machinery -----------------------------------------------------------------------------------


def _vmap_leading(fn, n_leading: int, *args):
    """Apply `fn` to the trailing dims of `args`, mapped over `n_leading` stacked (e.g. scanned-layer) axes."""
    for _ in range(n_leading):
        fn = jax.vmap(fn)
    return fn(*args)


def set_child(root, path: tuple, new) -> None:
    """Replace the attribute or list item at `path` (as `nnx.iter_modules` / flat states spell it) under `root`."""
    parent = root
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    key = path[-1]
    if isinstance(key, int):
        parent[key] = new
    else:
        setattr(parent, key, new)


class QuantizedOp(nnx.Module):
    """Common state and activation/weight handling for every quantized op."""

    op_kind = "dot_general"  # the rule op kind this module answers to

    def _init_quant(self, rule: Rule, mode: str, path: str, features: int, n_stacked: int):
        """Common state; the op starts in qat (or calibrate) and `convert` then moves it to `mode`."""
        self.path, self.n_stacked, self.features = path, n_stacked, features
        self.input_transform = nnx.data(None)
        self._reset_quant(rule, "calibrate" if mode == "calibrate" else "qat")

    def _reset_quant(self, rule: Rule, mode: str) -> None:
        """Quantization state for `rule`, as a freshly wrapped op in `mode` (qat or calibrate) has it."""
        self.rule, self.mode = rule, mode
        self.act_stats = nnx.data(None)
        self.act_scale = nnx.data(None)
        self.weight_scale = nnx.data(None)
        features = self.features
        if rule.act is not None and (rule.static_act or self.mode == "calibrate"):
            stack = self._stack_shape()  # stacked (scanned) layers get one set of statistics each
            stats = calibration.init_stats(calibration.stat_shape(rule.act, features))
            self.act_stats = QuantStat(jax.tree.map(lambda a: jnp.broadcast_to(a, stack + a.shape), stats))

    def _stack_shape(self) -> tuple[int, ...]:
        """Leading layer axes of a stacked float kernel (the op is built before any packing)."""
        if not self.n_stacked:
            return ()
        value = self.kernel.get_value()
        return tuple((value.values if isinstance(value, QArray) else value).shape[: self.n_stacked])

    # -- operands
    def _activation(self, x: jax.Array, quantize: bool = True):
        """The input after the online transform, quantized per the rule (unless `quantize` is False:
        LLM.int8() decomposes the float input inside the matmul)."""
        rule, mode = self.rule, self.mode
        if self.input_transform is not None:
            x = self.input_transform.get_value().apply(x)
        if not quantize:
            return x
        if rule.act is not None and mode == "calibrate":
            stats = self.act_stats.get_value()
            self.act_stats.set_value(calibration.observe(stats, x, rule.observer, rule.ema_decay, rule.percentile))
        scale = zp = None
        if rule.act is not None and rule.static_act and mode in ("ptq", "serve"):
            if self.act_scale is None:
                raise ValueError(f"{self.path}: static activation scales are not set; calibrate, then convert to {mode!r}")
            s = self.act_scale.get_value()
            scale = calibration.broadcast_static(s["scale"], x.ndim)
            zp = None if s["zero_point"] is None else calibration.broadcast_static(s["zero_point"], x.ndim)
        return quantize_activation(x, rule, mode, scale, zp)

    def _weight(self, w=None):
        learned = None if self.weight_scale is None else self.weight_scale.get_value()
        return quantize_weight(self.kernel.get_value() if w is None else w, self.rule, self.mode, learned)

    def _output(self, y: jax.Array) -> jax.Array:
        return y if self.rule.backward is None else quantize_gradient(y, self.rule.backward)

    def _matmul_mode(self) -> str:
        return matmul_mode(self.mode)

    def _outlier_threshold(self) -> float | None:
        """LLM.int8()'s threshold once activations are quantized (not while calibrating)."""
        return None if self.mode == "calibrate" or self.rule.act is None else self.rule.outlier_threshold

    # -- rules, weights and transforms set by methods
    def set_rule(self, rule: Rule, mode: str) -> None:
        """Re-quantize this op with a new rule (e.g. a later recipe's): the new rule is what counts.

        Float weights are simply re-quantized; weights already packed (ptq/serve, or set by a method
        such as GPTQ) are kept only when the new rule asks for the same weight spec.
        """
        if rule == self.rule:
            self.convert(mode)
            return
        packed = self.kernel is not None and isinstance(self.kernel.get_value(), QArray)
        if packed and rule.weight != self.rule.weight:
            raise ValueError(f"{self.path}: the weight is already packed with {self.rule.weight}; a new rule asks for "
                             f"{rule.weight}. Quantize the float model instead.")  # fmt: skip
        old_mode = self.mode
        self._reset_quant(rule, "calibrate" if mode == "calibrate" else "qat")
        if packed:
            self.mode = old_mode if old_mode in ("ptq", "serve") else "ptq"
        self.convert(mode)

    def set_weight(self, weight: QArray) -> None:
        """Use a weight computed by a method (GPTQ, AWQ's clipped codes) as this op's packed weight."""
        if self.rule.weight is None:
            raise ValueError(f"{self.path}: set_weight needs a rule with a weight spec")
        current = self.kernel.get_value()
        if tuple(weight.shape) != tuple(current.shape):
            raise ValueError(f"{self.path}: weight of shape {weight.shape} does not fit the kernel {tuple(current.shape)}")
        if weight.format != self.rule.weight.format:
            raise ValueError(f"{self.path}: weight format {weight.format.name} differs from the rule's {self.rule.weight.format.name}")
        self.kernel = QuantizedWeight(weight)
        self.weight_scale = None
        if self.mode not in ("ptq", "serve"):
            self.mode = "ptq"

    def add_input_transform(self, m, *, fold: bool = True) -> None:
        """Apply linear map `m` to the input at run time (after any earlier one); the float kernel absorbs
        its inverse when `fold`, so the float function is unchanged."""
        from qjax.numerics.linear_maps import compose, fold_into_kernel

        if fold:
            value = self.kernel.get_value()
            if isinstance(value, QArray):
                raise ValueError(f"{self.path}: cannot fold an input transform into an already packed weight")
            self.kernel.set_value(fold_into_kernel(m, value.astype(jnp.float32)).astype(value.dtype))
        old = None if self.input_transform is None else self.input_transform.get_value()
        self.input_transform = OnlineTransform(compose(old, m))

    # -- conversion between modes
    def convert(self, mode: str) -> None:
        """Move this op to `mode` in place (packing weights and freezing static scales as needed)."""
        rule, old = self.rule, self.mode
        if old in ("ptq", "serve") and mode in ("qat", "calibrate"):
            raise ValueError(f"{self.path}: cannot go from {old!r} back to {mode!r}: the float weights were packed")
        has_kernel = self.kernel is not None  # a dot_general hook quantizes its host's weight per call
        if mode == "qat" and rule.gradient == "lsq" and rule.weight is not None and has_kernel and self.weight_scale is None:
            self.weight_scale = LearnedScale(
                _vmap_leading(lambda k: init_lsq_scale(k, rule.weight), self.n_stacked, self.kernel.get_value())
            )
        if mode in ("ptq", "serve"):
            if rule.weight is not None and has_kernel and not isinstance(self.kernel.get_value(), QArray):
                learned = () if self.weight_scale is None else (self.weight_scale.get_value(),)  # LSQ scales carry over

                def pack(k, s=None):
                    return quantize(k, rule.weight.replace(rounding="nearest"), scale=s)

                self.kernel = QuantizedWeight(_vmap_leading(pack, self.n_stacked, self.kernel.get_value(), *learned))
                self.weight_scale = None
            if rule.act is not None and rule.static_act and self.act_scale is None:
                if self.act_stats is None:
                    raise ValueError(f"{self.path}: static_act needs calibration statistics; quantize with mode='calibrate' first")
                stats = self.act_stats.get_value()
                scale, zp = calibration.scale_from_stats(stats, rule.act)
                self.act_scale = StaticScale({"scale": scale, "zero_point": zp})
        self.mode = mode


def _stacked(kernel: jax.Array, base_ndim: int) -> int:
    return kernel.ndim - base_ndim


class QLinear(QuantizedOp):
    """Quantized `nnx.Linear` (kernel (in, out))."""

    def __init__(self, linear: nnx.Linear, rule: Rule, mode: str, path: str):
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = linear.kernel
        self.bias = linear.bias
        self.dtype = linear.dtype
        self._init_quant(rule, mode, path, linear.in_features,
                         _stacked(linear.kernel.get_value(), 2))  # fmt: skip
        self.convert(mode)

    def __call__(self, x: jax.Array) -> jax.Array:
        threshold = self._outlier_threshold()
        x = self._activation(x, quantize=threshold is None)
        w = self._weight()
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        y = qo.dot_general(x, w, dims, mode=self._matmul_mode(), preferred_element_type=self.dtype,
                           lhs_spec=None if threshold is None else self.rule.act, outlier_threshold=threshold)  # fmt: skip
        if self.bias is not None:
            y = y + self.bias.get_value()
        return self._output(y)


class QEinsum(QuantizedOp):
    """Quantized `nnx.Einsum` (weight in the module's `kernel_shape` layout)."""

    op_kind = "einsum"

    def __init__(self, einsum: nnx.Einsum, rule: Rule, mode: str, path: str):
        self.einsum_str = einsum.einsum_str.replace(" ", "")
        self.kernel = einsum.kernel
        self.bias = einsum.bias
        self.dtype = einsum.dtype
        lhs, rhs = self.einsum_str.split("->")[0].split(",")
        kshape = einsum.kernel.get_value().shape
        features = math.prod(kshape[rhs.index(c)] for c in lhs if c in rhs)
        self._init_quant(rule, mode, path, features,
                         _stacked(einsum.kernel.get_value(), len(rhs)))  # fmt: skip
        self.convert(mode)

    def __call__(self, x: jax.Array) -> jax.Array:
        threshold = self._outlier_threshold()
        x = self._activation(x, quantize=threshold is None)
        y = qo.einsum(self.einsum_str, x, self._weight(), mode=self._matmul_mode(), preferred_element_type=self.dtype,
                      lhs_spec=None if threshold is None else self.rule.act, outlier_threshold=threshold)  # fmt: skip
        if self.bias is not None:
            y = y + _einsum_bias_view(self.einsum_str, self.bias.get_value(), y.ndim)
        return self._output(y)


def _einsum_bias_view(einsum_str: str, bias: jax.Array, out_ndim: int) -> jax.Array:
    """Broadcast an Einsum bias (the kernel-derived output dims, in order) against the output."""
    ins, out = einsum_str.split("->")
    rhs = ins.split(",")[1]
    shape = [1] * out_ndim
    kernel_dims = [i for i, c in enumerate(out) if c in rhs]
    for i, size in zip(kernel_dims, bias.shape[-len(kernel_dims):] if kernel_dims else ()):
        shape[i] = size
    return bias.reshape(shape)


class QConv(QuantizedOp):
    """Quantized `nnx.Conv` (kernel (*window, in // groups, out)); string/explicit padding, no mask."""

    op_kind = "conv"

    def __init__(self, conv: nnx.Conv, rule: Rule, mode: str, path: str):
        if isinstance(conv.padding, str) and conv.padding.upper() in ("CIRCULAR", "REFLECT", "CAUSAL"):
            raise NotImplementedError(f"{path}: QConv supports SAME/VALID/explicit padding, not {conv.padding!r}")
        if getattr(conv, "mask", None) is not None:
            raise NotImplementedError(f"{path}: QConv does not support masked kernels")
        self.kernel, self.bias, self.dtype = conv.kernel, conv.bias, conv.dtype
        self.kernel_size = tuple(conv.kernel_size)
        n = len(self.kernel_size)
        self.strides = _tuple(conv.strides, n)
        self.padding = conv.padding if isinstance(conv.padding, str) else _padding_pairs(conv.padding, n)
        self.input_dilation = _tuple(conv.input_dilation, n)
        self.kernel_dilation = _tuple(conv.kernel_dilation, n)
        self.feature_group_count = conv.feature_group_count
        self._init_quant(rule, mode, path, conv.in_features,
                         _stacked(conv.kernel.get_value(), n + 2))  # fmt: skip
        self.convert(mode)

    def __call__(self, x: jax.Array) -> jax.Array:
        n = len(self.kernel_size)
        unbatched = x.ndim == n + 1
        if unbatched:
            x = x[None]
        x = self._activation(x)
        spatial = "".join("HWDXYZ"[i] for i in range(n))
        dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
        y = qo.conv_general_dilated(
            x, self._weight(), self.strides, self.padding, self.input_dilation, self.kernel_dilation, dn,
            self.feature_group_count, mode=self._matmul_mode(), preferred_element_type=self.dtype,
        )  # fmt: skip
        if self.bias is not None:
            y = y + self.bias.get_value()
        y = y[0] if unbatched else y
        return self._output(y)


def _tuple(v, n) -> tuple[int, ...]:
    if v is None:
        return (1,) * n
    return (v,) * n if isinstance(v, int) else tuple(v)


def _padding_pairs(p, n) -> Sequence[tuple[int, int]]:
    if isinstance(p, int):
        return [(p, p)] * n
    return [(q, q) if isinstance(q, int) else tuple(q) for q in p]


class QEmbed(QuantizedOp):
    """Quantized `nnx.Embed` (table (vocab, features)); `attend` is the tied output projection."""

    op_kind = "embed"

    def __init__(self, embed: nnx.Embed, rule: Rule, mode: str, path: str):
        self.num_embeddings, self.features = embed.num_embeddings, embed.features
        self.kernel = embed.embedding  # named kernel so the shared weight logic applies
        self.dtype = embed.dtype
        self._init_quant(rule, mode, path, embed.features,
                         _stacked(embed.embedding.get_value(), 2))  # fmt: skip
        self.convert(mode)

    @property
    def embedding(self):
        return self.kernel

    def __call__(self, ids: jax.Array) -> jax.Array:
        value = self.kernel.get_value()
        if isinstance(value, QArray) and value.tiles[0] == 1:
            table = _gather_rows(value, ids)  # dequantize only the rows looked up
        else:
            w = self._weight()
            w = w.dequantize() if isinstance(w, QArray) else w
            table = jnp.take(w, ids, axis=0)
        return table.astype(self.dtype or table.dtype)

    def attend(self, query: jax.Array) -> jax.Array:
        """Tied-embedding logits `query @ table.T`, with this rule's activation/weight quantization."""
        x = self._activation(query)
        dims = (((x.ndim - 1,), (1,)), ((), ()))
        return self._output(qo.dot_general(x, self._weight(), dims, mode=self._matmul_mode()))


def _gather_rows(q: QArray, ids: jax.Array) -> jax.Array:
    """Rows `ids` of a per-row-quantized table, dequantized."""
    flat = ids.reshape(-1)
    rows = QArray(
        jnp.take(q.values, flat, axis=0),
        jnp.take(q.scale, flat, axis=0),
        None if q.zero_point is None else jnp.take(q.zero_point, flat, axis=0),
        q.format, (flat.shape[0], q.shape[1]), q.tiles, q.dtype,
    )  # fmt: skip
    return rows.dequantize().reshape(*ids.shape, q.shape[1])


class QDotGeneral(QuantizedOp):
    """A quantized `dot_general` hook for modules that expose one (`module.dot_general = QDotGeneral(...)`).

    The rhs is taken to be the weight and is quantized on every call (it stays a float parameter of
    the host module); use it for custom modules that follow Flax's `dot_general=` convention.
    """

    def __init__(self, rule: Rule, mode: str, path: str, features: int | None = None):
        if rule.act is not None and (rule.static_act or mode == "calibrate") and features is None:
            raise ValueError(f"{path}: static activation scales need the input feature count (an `in_features` attribute)")
        if rule.gradient == "lsq":
            raise NotImplementedError(f"{path}: LSQ scales live with the weight; quantize a Linear/Einsum/Conv module for LSQ")
        self.kernel = nnx.data(None)
        self._init_quant(rule, mode, path, features or 0, 0)
        self.convert(mode)

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
        x = self._activation(lhs)
        y = qo.dot_general(x, self._weight(rhs), dimension_numbers, precision, preferred_element_type,
                           mode=self._matmul_mode())  # fmt: skip
        return self._output(y)

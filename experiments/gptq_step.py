"""Pipeline step `gptq`: GPTQ weights for the decoder layers' linears, layer by layer (as IST-DASLab/gptq).

The calibration batches run through the embedding; then for each layer i, on the hidden states that the
already quantized layers < i produce: the layer's linears are taken in sequential sub-groups (llama:
q/k/v, o_proj, gate/up, down_proj — linears that read the same input go together); for each sub-group the
Hessian H = 2/N Σ x xᵀ of every matched linear's input is collected *with the earlier sub-groups already
quantized*, `gptq_quantize` packs the kernel, and the op becomes a quantized op whose rule has this weight
spec (activations stay float). The layer's outputs, with the quantized layer, are layer i+1's inputs.

A later `quantize` step with the same weight spec (and e.g. an activation spec) keeps these packed weights.

Online input transforms (rotations from rotate/duquant): the op multiplies by T⁻¹W what it receives as
x T, so its Hessian must be that of x T. `stats.collect` observes the call argument x, before the
transform; since T is linear, H(x T) = Mᵀ H(x) M with M = T.apply(I) — applied here per linear, which is
exactly the Hessian an observer over `T.apply(x)` would collect (up to float rounding).
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qjax.experiments import stats
from qjax.experiments.config import SpecConfig
from qjax.experiments.gptq import gptq_quantize
from qjax.experiments.schema import check_regex
from qjax.experiments.pipeline import Context, register
from qjax.models.structure import FamilyMap, family_of, get_module, unstack_layers
from qjax.numerics import QArray, QuantSpec
from qjax.numerics.granularity import FULL
from qjax.transforms import float_op
from qjax.transforms.nnx_modules import QuantizedOp, set_child


@dataclasses.dataclass
class GPTQConfig:
    """GPTQ for the decoder layers' linears whose full path (`layers.3.mlp.down_proj`) fullmatches `pattern`."""

    weight: SpecConfig
    pattern: str = ".*"
    block_size: int = 128
    act_order: bool = False  # process input features by descending diag H
    static_groups: bool = False  # group scales from the original weights (needed by act_order with groups)
    damp: float = 0.01  # relative to mean diag H; ×10 per retry (3 retries) if H is not positive definite

    def __post_init__(self):
        check_regex(self.pattern, "gptq: pattern")
        if self.block_size < 1 or not self.damp > 0:
            raise ValueError(f"gptq needs block_size >= 1 and damp > 0, got block_size={self.block_size}, damp={self.damp}")
        if self.weight.rounding != "nearest":
            raise ValueError(f"gptq rounds to nearest; got weight rounding {self.weight.rounding!r}")

    def spec(self) -> QuantSpec:
        return self.weight.to_spec("weight")


def sub_groups(model, fam: FamilyMap) -> list[tuple[str, ...]]:
    """The layer's linears in execution order, split into runs that read the same input (one Hessian pass each)."""
    same_input = [set(g.consumers) for g in fam.groups(model)]
    runs: list[list[str]] = []
    for path in fam.linears:
        if runs and any(path in s and runs[-1][-1] in s for s in same_input):
            runs[-1].append(path)
        else:
            runs.append([path])
    return [tuple(r) for r in runs]


def matched_linears(model, fam: FamilyMap, cfg: GPTQConfig) -> list[tuple[int, str]]:
    """(layer index, path relative to the layer) of every linear GPTQ quantizes."""
    pattern = re.compile(cfg.pattern)
    n = len(fam.layers(model))
    return [(i, rel) for i in range(n) for rel in fam.linears if pattern.fullmatch(fam.layer_path(i, rel))]


def check(model, cfg: GPTQConfig) -> None:
    """Refuse, before any work, models and configs GPTQ cannot run on (family, pattern, packed weights, groups)."""
    fam = family_of(model, "gptq")
    model = unstack_layers(model)
    found = matched_linears(model, fam, cfg)
    if not found:
        raise ValueError(f"gptq: pattern {cfg.pattern!r} matches no linear of the decoder layers ({', '.join(fam.linears)})")
    spec, layers = cfg.spec(), fam.layers(model)
    requested = dict((a % 2, s) for a, s in spec.granularity.tiles).get(0, FULL)
    for i, rel in found:
        path, kernel = fam.layer_path(i, rel), get_module(layers[i], rel).kernel.get_value()
        if isinstance(kernel, QArray):
            raise ValueError(f"gptq: {path} already holds a packed weight; run gptq on the float model")
        n_in = kernel.shape[0]
        if cfg.act_order and requested != FULL and requested > n_in:
            raise ValueError(f"gptq: group size {requested} is larger than the input dimension {n_in} of {path} (act_order)")
        if cfg.act_order and not cfg.static_groups and spec.granularity.tile_shape(kernel.shape)[0] < n_in:
            raise ValueError(f"gptq: act_order with input groups of {requested} needs static_groups=True ({path})")


def _transformed_hessian(h: np.ndarray, module) -> np.ndarray:
    """H of the op's input after its online transform T: Mᵀ H M with M = T.apply(I) (H if there is none)."""
    t = getattr(module, "input_transform", None)
    if t is None:
        return h
    m = np.asarray(t.get_value().apply(jnp.eye(h.shape[0], dtype=jnp.float32)), np.float64)
    return m.T @ h @ m


def install_weight(layer, rel: str, path: str, spec: QuantSpec, weight: QArray) -> None:
    """Make the linear at `rel` a quantized op with weight spec `spec` (float activations) holding `weight`."""
    module = get_module(layer, rel)
    op = module if isinstance(module, QuantizedOp) else float_op(module, path)
    if op is not module:
        set_child(layer, tuple(int(k) if k.isdigit() else k for k in rel.split(".")), op)
    op.set_rule(dataclasses.replace(op.rule, weight=spec), "qat")
    op.set_weight(weight)


@register("gptq", GPTQConfig, check=check)
def gptq_step(model, cfg: GPTQConfig, ctx: Context):
    fam = family_of(model, "gptq")
    model = unstack_layers(model)
    spec, todo = cfg.spec(), set(matched_linears(model, fam, cfg))
    hidden, auxes = [], {}
    for b in ctx.calibration_batches("gptq"):
        x, aux = fam.embed(model, jnp.asarray(b))
        hidden.append(x)
        auxes[x.shape[:2]] = aux  # the aux (positions, RoPE tables) depends only on the batch shape

    def call(layer, x):
        return fam.call_layer(layer, x, auxes[x.shape[:2]])

    run = nnx.jit(call)
    retries, error, damp_max, count = 0, 0.0, 0.0, 0
    layers = fam.layers(model)
    for i in tqdm(range(len(layers)), desc=f"{ctx.label}: gptq", disable=not ctx.progress, unit="layer"):
        layer = layers[i]
        for group in sub_groups(model, fam):
            paths = [rel for rel in group if (i, rel) in todo]
            if not paths:
                continue
            xtx = stats.collect(layer, hidden, lambda p, m: p in paths, stats.xtx(), call=call)
            stats.check_finite(xtx, f"gptq (layer {i})")
            for rel in paths:
                path, module = fam.layer_path(i, rel), get_module(layer, rel)
                h = _transformed_hessian(np.asarray(stats.hessian(xtx[rel]), np.float64), module)
                qa, info = gptq_quantize(module.kernel.get_value(), h, spec, block_size=cfg.block_size, act_order=cfg.act_order,
                                         static_groups=cfg.static_groups, damp=cfg.damp, path=path)  # fmt: skip
                install_weight(layer, rel, path, spec, qa)
                retries, error, damp_max, count = retries + info.retries, error + info.error, max(damp_max, info.damp), count + 1
        hidden = [run(layer, x) for x in hidden]
    ctx.metrics.update(gptq_linears=count, gptq_retries=retries, gptq_error=error, gptq_damp_max=damp_max)
    return model

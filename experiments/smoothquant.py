"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights with per-channel scales.

For every group (a producer feeding consumer linears) s_j = max|X_j|^α / max_i|W_ji|^(1−α) (max|W| over
the rows j of all consumer kernels, both clamped ≥ min_scale); the producer's output is divided by s and
the consumers' kernel rows multiplied by it (`fold_scale`): exact in float. α is fixed, or searched per
layer and group over `alpha_grid` on the consumers' output error under fake W/A quantization.

Execution is sequential (layer by layer): layer i's statistics come from the outputs of the already
smoothed layers < i, computed from the calibration batches with `fam.embed` / `fam.call_layer`. In float
this equals one collect on the original model; it is chosen because the α search needs per-layer passes
anyway, and it keeps memory at one layer's activations.

The helpers below (sequential driver, per-producer statistics, the search loss) are shared with OS+.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qjax.experiments import stats
from qjax.experiments.pipeline import Context, register
from qjax.models.structure import FamilyMap, Group, family_of, fold_scale, get_module, group_width, unstack_layers
from qjax.numerics import QuantSpec, per_axis, per_token
from qjax.numerics.quantize import quantize_dequantize

ALPHA_GRID = [round(0.05 * i, 2) for i in range(21)]
GROUP_CHOICES = ("norms", "all")


@dataclasses.dataclass
class SmoothQuantConfig:
    """alpha: migration strength in [0, 1], or None to search `alpha_grid` per layer and group.
    groups: "norms" (norm → linears, as in the paper) or "all" (also v → o, up → down).
    act_bits / weight_bits: the fake quantization (per-token activations, per-channel weights) of the search loss.
    min_scale: lower clamp of s and of max|W| (the reference's 1e-5)."""

    alpha: float | None = 0.5
    alpha_grid: list[float] = dataclasses.field(default_factory=lambda: list(ALPHA_GRID))
    groups: str = "norms"
    act_bits: int = 8
    weight_bits: int = 8
    min_scale: float = 1e-5

    def __post_init__(self):
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smoothquant: alpha must be in [0, 1] (or null to search), got {self.alpha}")
        if not self.alpha_grid or any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ValueError(f"smoothquant: alpha_grid must be a non-empty list of values in [0, 1], got {self.alpha_grid}")
        check_common(self, "smoothquant")


def check_common(cfg, step: str) -> None:
    """Validation shared by SmoothQuant and OS+ configs: groups, bit widths, min_scale."""
    if cfg.groups not in GROUP_CHOICES:
        raise ValueError(f"{step}: groups must be one of {GROUP_CHOICES}, got {cfg.groups!r}")
    for name in ("act_bits", "weight_bits"):
        if not 2 <= getattr(cfg, name) <= 8:
            raise ValueError(f"{step}: {name} must be in 2..8, got {getattr(cfg, name)}")
    if not cfg.min_scale > 0:
        raise ValueError(f"{step}: min_scale must be positive, got {cfg.min_scale}")


# ---- shared helpers (SmoothQuant, OS+) ------------------------------------------------------------------


def quant_specs(act_bits: int, weight_bits: int) -> tuple[QuantSpec, QuantSpec]:
    """Per-token activation and per-output-channel weight specs of the search loss."""
    return QuantSpec(f"int{act_bits}", per_token()), QuantSpec(f"int{weight_bits}", per_axis(1))


def selected_groups(model, fam, which: str) -> tuple[Group, ...]:
    """The family's groups: only norm → linears ("norms"), or every group ("all")."""
    return tuple(g for g in fam.groups(model) if which == "all" or g.kind != "linear")


def consumer_kernel(layer, g: Group) -> jax.Array:
    """The consumers' float kernels side by side (C, Σ out): one matmul gives every consumer's output."""
    kernels = []
    for path in g.consumers:
        k = get_module(layer, path).kernel.get_value()
        if not isinstance(k, jax.Array | np.ndarray):
            raise ValueError(f"{path}: the weight is already packed; smooth the float model before quantizing")
        kernels.append(jnp.asarray(k, jnp.float32))
    return jnp.concatenate(kernels, axis=1)


def to_producer(values, g: Group, width: int, reduce=np.maximum) -> np.ndarray:
    """Per-consumer-channel values reduced (max or min) over the consumer channels reading each producer channel."""
    values = np.asarray(values, np.float64)
    out = np.full(width, -np.inf if reduce is np.maximum else np.inf)
    reduce.at(out, g.consumer_index(values.shape[0]), values)
    return out


def loss_observer(kernel: jax.Array, shifts: jax.Array, scales: jax.Array, specs: tuple[QuantSpec, QuantSpec]) -> stats.Observer:
    """Per candidate (z, s) (rows of `shifts`/`scales`, consumer channels): Σ ‖Q_a((x − z)/s)·Q_w(s·W) − (x − z)·W‖²."""
    act_spec, weight_spec = specs
    dot = lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)  # noqa: E731

    def one(x, zs):
        z, s = zs
        xc = x - z
        y = dot(quantize_dequantize(xc / s, act_spec), quantize_dequantize(kernel * s[:, None], weight_spec))
        return jnp.sum((y - dot(xc, kernel)) ** 2)

    def update(state, x):
        rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        return state + jax.lax.map(lambda zs: one(rows, zs), (shifts, scales))

    return stats.Observer(lambda f: jnp.zeros((scales.shape[0],), jnp.float32), update)


@dataclasses.dataclass
class LayerInputs:
    """Hidden states entering the current layer (one per calibration batch) and the aux inputs per batch shape."""

    fam: FamilyMap
    hidden: list[jax.Array]
    aux: dict[tuple[int, int], tuple]

    def collect(self, layer, paths: list[str], observer: stats.Observer) -> dict:
        """Observer states of the inputs of `paths` (relative to the layer) over all batches."""
        where = "|".join(re.escape(p) for p in paths)
        call = lambda m, h: self.fam.call_layer(m, h, self.aux[h.shape[:2]])  # noqa: E731
        return stats.collect(layer, self.hidden, where, observer, call=call)


def sequential(model, batches, fn: Callable[[int, object, LayerInputs], None], step: str, progress: bool = False):
    """Run `fn(i, layer, inputs)` on each layer in order; its inputs come from the already transformed layers < i."""
    model = unstack_layers(model)
    fam = family_of(model, step)
    embed = nnx.jit(fam.embed)
    call = nnx.jit(fam.call_layer)
    hidden, aux = [], {}
    for b in batches:
        h, a = embed(model, jnp.asarray(b))
        hidden.append(h)
        aux[tuple(h.shape[:2])] = a
    inputs = LayerInputs(fam, hidden, aux)
    for i, layer in enumerate(tqdm(fam.layers(model), desc=step, disable=not progress, unit="layer")):
        fn(i, layer, inputs)
        inputs.hidden = [call(layer, h, aux[tuple(h.shape[:2])]) for h in inputs.hidden]
    return model


def first_consumer_stats(i: int, layer, groups, inputs: LayerInputs, observer, step: str) -> list:
    """Observer state of each group's input (at its first consumer); an error if any input is not finite
    (counted separately: fused max reductions may drop NaNs)."""
    paths = sorted({g.consumers[0] for g in groups})
    got = inputs.collect(layer, paths, stats.combine(value=observer, nonfinite=stats.nonfinite()))
    for p, v in got.items():
        if float(v["nonfinite"]) > 0:
            raise ValueError(f"{step}: statistics of {inputs.fam.layer_path(i, p)} contain {int(v['nonfinite'])} non-finite "
                             "input value(s); the calibration data (or the activations it produced) are not finite")  # fmt: skip
    stats.check_finite({inputs.fam.layer_path(i, p): v["value"] for p, v in got.items()}, step)
    return [got[g.consumers[0]]["value"] for g in groups]


def search(layer, g: Group, inputs: LayerInputs, shift: np.ndarray, scales: list[np.ndarray], specs) -> np.ndarray:
    """The search loss of each candidate scale (producer channels) for one group, with a common shift."""
    idx = g.consumer_index(get_module(layer, g.consumers[0]).kernel.get_value().shape[0])
    zs = jnp.asarray(np.broadcast_to(shift[idx], (len(scales), idx.size)), jnp.float32)
    ss = jnp.asarray(np.stack([s[idx] for s in scales]), jnp.float32)
    obs = loss_observer(consumer_kernel(layer, g), zs, ss, specs)
    return np.asarray(inputs.collect(layer, [g.consumers[0]], obs)[g.consumers[0]], np.float64)


# ---- SmoothQuant --------------------------------------------------------------------------------------------


def smoothing_scale(act_absmax, weight_absmax, alpha: float, min_scale: float = 1e-5) -> np.ndarray:
    """s = max|X|^α / max(max|W|, min_scale)^(1−α), clamped ≥ min_scale (float64)."""
    a, w = np.asarray(act_absmax, np.float64), np.maximum(np.asarray(weight_absmax, np.float64), min_scale)
    return np.maximum(a**alpha / w ** (1.0 - alpha), min_scale)


def smoothquant(model, cfg: SmoothQuantConfig, batches, progress: bool = False):
    """Smooth every layer (in place on its layers; returns the model) and a report per (layer, group):
    {"layer", "producer", "alpha", "losses" (one per grid value, searched only)}."""
    fam = family_of(model, "smoothquant")
    groups = selected_groups(model, fam, cfg.groups)
    specs = quant_specs(cfg.act_bits, cfg.weight_bits)
    report = []

    def smooth_layer(i, layer, inputs):
        for g, amax_c in zip(groups, first_consumer_stats(i, layer, groups, inputs, stats.absmax(), "smoothquant"), strict=True):
            width = group_width(layer, g)
            amax = to_producer(amax_c, g, width)
            wmax = to_producer(np.abs(np.asarray(consumer_kernel(layer, g))).max(1), g, width)
            alphas = [cfg.alpha] if cfg.alpha is not None else list(cfg.alpha_grid)
            scales = [smoothing_scale(amax, wmax, a, cfg.min_scale) for a in alphas]
            losses = search(layer, g, inputs, np.zeros(width), scales, specs) if len(alphas) > 1 else None
            k = 0 if losses is None else int(np.argmin(losses))
            fold_scale(layer, g, jnp.asarray(scales[k], jnp.float32))
            report.append({"layer": i, "producer": g.producer, "alpha": alphas[k], "losses": losses})

    return sequential(model, batches, smooth_layer, "smoothquant", progress), report


def check(model, cfg: SmoothQuantConfig) -> None:
    """The model must have a structure map (Llama family, OPT, GPT-2)."""
    family_of(model, "smoothquant")


@register("smoothquant", SmoothQuantConfig, check=check)
def smoothquant_step(model, cfg: SmoothQuantConfig, ctx: Context):
    model, report = smoothquant(model, cfg, ctx.calibration_batches("smoothquant"), ctx.progress)
    if cfg.alpha is None:
        ctx.metrics["smoothquant_alpha_mean"] = float(np.mean([r["alpha"] for r in report]))
    return model

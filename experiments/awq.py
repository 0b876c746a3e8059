"""AWQ (Lin et al. 2024, activation-aware weight quantization): per-channel scales searched on the output
error, folded into the float model, then (optionally) a per-tile clip search and packed weights.

Per decoder layer (sequentially: layer i's inputs come from the already processed layers < i) and per
group (a producer feeding consumer linears, `fam.groups`):

- scales: m_j = mean|x_j| over the calibration tokens (per producer channel; under GQA averaged over
  the o_proj input channels that read V channel j), s(r) = max(m, 1e-4)^r normalised by
  sqrt(max s · min s), for r ∈ {0, 1/grid, …, (grid−1)/grid}; the r minimising the consumers' output
  error Σ‖(x/s)·Q(s·W) − x·W‖² (weights fake-quantized with the config's spec, activations float) is
  folded with `fold_scale` (exact in float). r = 0 is s = 1, so the chosen s never does worse than none.
  (llm-awq measures the norm groups' error at the output of the whole attention / MLP block; here it is the
  consumers' outputs, which keeps the loss a quadratic form in the input statistics, below.)
- clip (if `clip`): per matched linear and weight tile (output channel × input group), the range is
  shrunk to ±max|W_tile|·(1 − i/clip_grid) (i = 0 … down to `clip_min`) and the ratio minimising that
  tile's share of the output error, Σ_t (x_t,g · (Q(W)−W)_g,o)², is kept (as llm-awq's auto_clip: output
  error per group, not weight error). The linear then becomes a quantized op with the config's weight
  spec holding these packed codes (`set_weight`, as the gptq step); activations stay float. As in
  llm-awq, q_proj/k_proj are not clipped (`clip_skip`; their outputs meet in q·kᵀ), only rounded.

Both searches are quadratic forms in the Gram matrix G = Σ_t x_t x_tᵀ of each linear's input, collected
once per layer with an observer (memory C², no activations stored): ‖x·Δ‖² summed over tokens is
Σ_o Δ_oᵀ G Δ_o, and a tile's share uses G's diagonal block of its input group. This is exact (all
calibration tokens, no subsample) and costs C²·(out) per candidate instead of tokens·C·(out). Folding s
turns a consumer input x into x/s, so its Gram becomes G / (s sᵀ): no second pass is needed.

Composition with GPTQ (`[awq: {weight: W, clip: false}, gptq: {weight: W}]`): llm-awq's AWQ+GPTQ applies
the AWQ scales only and lets GPTQ quantize; `clip: false` does exactly that (float kernels, scales
folded). With `clip: true` the kernels are packed, and gptq refuses them (as it refuses any packed weight).
A later `quantize` step with the same weight spec keeps the packed AWQ weights (e.g. to add activations).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from qjax.experiments import stats
from qjax.experiments.config import SpecConfig
from qjax.experiments.gptq_step import install_weight
from qjax.experiments.gptq_step import matched_linears
from qjax.experiments.schema import check_regex
from qjax.experiments.pipeline import Context, register
from qjax.experiments.smoothquant import GROUP_CHOICES, LayerInputs, consumer_kernel, selected_groups, sequential
from qjax.models.structure import Group, family_of, fold_scale, get_module, group_width, unstack_layers
from qjax.numerics import QArray, QuantSpec, quantize, quantize_dequantize, scale_from_range
from qjax.numerics.granularity import tile_axes, to_tiles

MIN_ACT = 1e-4  # floor of mean|x| before the power (llm-awq's clamp), so dead channels get a finite scale


@dataclasses.dataclass
class AWQConfig:
    """weight: the weight spec the searches quantize with (and the packed weights use), e.g. int4 group 128
    asymmetric. ratio_grid: r ∈ {0, 1/grid, …, (grid−1)/grid}. clip: search clip ranges and install packed
    weights (else only fold the scales, leaving float kernels). clip_grid / clip_min: ratios 1 − i/clip_grid
    down to clip_min. clip_skip: regex (fullmatch, full path) of linears rounded without clip search (null:
    none). pattern: regex (fullmatch) on the decoder linears' full paths (`layers.3.mlp.down_proj`) that AWQ
    quantizes; a group is searched when one of its consumers matches (the loss counts the matched ones; the
    others are only rescaled, exactly). groups: "all" (norm → q/k/v, v → o,
    norm → gate/up, up → down) or "norms" (norm → linears only)."""

    weight: SpecConfig
    ratio_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    clip_min: float = 0.5
    clip_skip: str | None = r".*\.(q_proj|k_proj)"
    pattern: str = ".*"
    groups: str = "all"

    def __post_init__(self):
        for name in ("pattern", "clip_skip"):
            check_regex(getattr(self, name) or "", f"awq: {name}")
        if self.ratio_grid < 1 or self.clip_grid < 1:
            raise ValueError(f"awq: ratio_grid and clip_grid must be >= 1, got {self.ratio_grid} and {self.clip_grid}")
        if not 0.0 < self.clip_min <= 1.0:
            raise ValueError(f"awq: clip_min must be in (0, 1], got {self.clip_min}")
        if self.groups not in GROUP_CHOICES:
            raise ValueError(f"awq: groups must be one of {GROUP_CHOICES}, got {self.groups!r}")
        if self.weight.rounding != "nearest":
            raise ValueError(f"awq rounds to nearest; got weight rounding {self.weight.rounding!r}")

    def spec(self) -> QuantSpec:
        return self.weight.to_spec("weight")

    def ratios(self) -> list[float]:
        """The scale exponents r searched."""
        return [i / self.ratio_grid for i in range(self.ratio_grid)]

    def clip_ratios(self) -> np.ndarray:
        """Clip ratios 1, 1 − 1/clip_grid, … down to clip_min inclusive (llm-awq stops one step above its 0.5);
        widest first, so ties keep the widest."""
        return 1.0 - np.arange(int(np.floor((1.0 - self.clip_min) * self.clip_grid + 1e-9)) + 1) / self.clip_grid


# ---- numerics (pure) -----------------------------------------------------------------------------------------


def _dot(a, b):
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def gram() -> stats.Observer:
    """Σ_t x_t x_tᵀ over tokens at full float32 precision: both search losses are quadratic forms in it."""

    def update(state, x):
        rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        return state + _dot(rows.T, rows)

    return stats.Observer(lambda f: jnp.zeros((f, f), jnp.float32), update)


def awq_scales(mean_abs, ratios) -> np.ndarray:
    """Candidate scales (len(ratios), C): max(mean|x|, 1e-4)^r / sqrt(max · min) (float64)."""
    m = np.maximum(np.asarray(mean_abs, np.float64), MIN_ACT)
    s = np.stack([m**r for r in ratios])
    return s / np.sqrt(s.max(1, keepdims=True) * s.min(1, keepdims=True))


def producer_mean(values, g: Group, width: int) -> np.ndarray:
    """Per-consumer-channel means averaged over the consumer channels that read each producer channel (GQA)."""
    values = np.asarray(values, np.float64)
    idx = g.consumer_index(values.shape[0])
    return np.bincount(idx, values, width) / np.maximum(np.bincount(idx, minlength=width), 1)


@functools.partial(jax.jit, static_argnames="spec")
def scale_losses(gram_: jax.Array, kernels: tuple[jax.Array, ...], scales: jax.Array, spec: QuantSpec) -> jax.Array:
    """Σ over tokens and kernels of ‖(x/s)·Q(s·W) − x·W‖² for each row s of `scales` (consumer channels),
    with G = Σ x xᵀ: Σ_o Δ_oᵀ G Δ_o, Δ = Q(s·W)/s − W."""

    def one(s):
        total = jnp.zeros((), jnp.float32)
        for w in kernels:
            err = quantize_dequantize(w * s[:, None], spec) / s[:, None] - w
            total = total + jnp.sum(err * _dot(gram_, err))
        return total

    return jax.lax.map(one, scales)


def tile_output_errors(gram_: jax.Array, err: jax.Array, tiles: tuple[int, int]) -> jax.Array:
    """Each weight tile's share of Σ_t ‖x_t·err‖²: Σ_{o∈tile} err_goᵀ G_gg err_go over its input rows g."""
    et = to_tiles(err, tiles)  # (ni, ti, no, to)
    ni, ti = et.shape[0], et.shape[1]
    pad = ni * ti - gram_.shape[0]
    gt = jnp.pad(gram_, ((0, pad), (0, pad))).reshape(ni, ti, ni, ti)
    blocks = jnp.einsum("kikj->kij", gt)  # the diagonal blocks G_gg
    return jnp.einsum("kij,kjnt,kint->kn", blocks, et, et, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames="spec")
def clip_search(w: jax.Array, gram_: jax.Array, ratios: jax.Array, spec: QuantSpec):
    """Per weight tile: the clip ratio (of `ratios`, widest first; ties keep the earlier) minimising the tile's
    output error. The range of a tile is [max(lo, −t), min(hi, t)] with t = max|W_tile|·ratio (llm-awq).
    Returns (scale, zero_point) for `quantize`, the chosen ratio, its error and the first ratio's error per tile."""
    w = w.astype(jnp.float32)
    tiles = spec.granularity.tile_shape(w.shape)
    wt = to_tiles(w, tiles)
    axes, compact = tile_axes(2), wt.shape[0::2]
    lo, hi = jnp.min(wt, axis=axes).reshape(compact), jnp.max(wt, axis=axes).reshape(compact)
    amax = jnp.maximum(-lo, hi)
    search = spec.replace(clip_ratio=1.0)

    def candidate(r):
        t = amax * r
        scale, zero_point = scale_from_range(jnp.maximum(lo, -t), jnp.minimum(hi, t), search)
        err = quantize_dequantize(w, search, scale=scale, zero_point=zero_point) - w
        return tile_output_errors(gram_, err, tiles), scale, zero_point, jnp.full(compact, r, jnp.float32)

    def step(best, r):
        new = candidate(r)
        better = new[0] < best[0]
        return jax.tree.map(lambda n, b: jnp.where(better, n, b), new, best), None

    first = candidate(ratios[0])
    (err, scale, zero_point, chosen), _ = jax.lax.scan(step, first, ratios[1:])
    return scale, zero_point, chosen, err, first[0]


# ---- the step ------------------------------------------------------------------------------------------------


def _input_key(rel: str, all_groups) -> str:
    """The linear whose input a linear shares (its group's first consumer), so each input is collected once."""
    return next((g.consumers[0] for g in all_groups if rel in g.consumers), rel)


def awq(model, cfg: AWQConfig, batches, progress: bool = False):
    """AWQ on every layer (in place on its layers; returns the model) and a report: per (layer, group)
    {"layer", "producer", "ratio", "losses"}, per clipped linear {"path", "clip_ratio" (mean), "error", "error_rtn"}."""
    fam = family_of(model, "awq")
    all_groups = fam.groups(model)
    groups, spec, pattern = selected_groups(model, fam, cfg.groups), cfg.spec(), re.compile(cfg.pattern)
    skip = re.compile(cfg.clip_skip) if cfg.clip_skip else None
    ratios, clip_ratios = cfg.ratios(), jnp.asarray(cfg.clip_ratios(), jnp.float32)
    report = {"scales": [], "clip": []}

    def layer_fn(i: int, layer, inputs: LayerInputs):
        matched = [rel for rel in fam.linears if pattern.fullmatch(fam.layer_path(i, rel))]
        searched = [g for g in groups if any(c in matched for c in g.consumers)]
        keys = sorted({g.consumers[0] for g in searched} | ({_input_key(r, all_groups) for r in matched} if cfg.clip else set()))
        if not keys:
            return
        got = inputs.collect(layer, keys, stats.combine(gram=gram(), mean=stats.mean_abs()))
        stats.check_finite({fam.layer_path(i, k): v for k, v in got.items()}, "awq")
        grams = {k: v["gram"] for k, v in got.items()}
        for g in searched:
            key, cons = g.consumers[0], tuple(c for c in g.consumers if c in matched)
            kernel = consumer_kernel(layer, dataclasses.replace(g, consumers=cons))
            cuts = np.cumsum([get_module(layer, c).kernel.get_value().shape[1] for c in cons])[:-1]
            width, idx = group_width(layer, g), g.consumer_index(kernel.shape[0])
            cands = awq_scales(producer_mean(stats.mean_of(got[key]["mean"]), g, width), ratios)
            kernels = tuple(jnp.split(kernel, cuts, axis=1))
            losses = np.asarray(scale_losses(grams[key], kernels, jnp.asarray(cands[:, idx], jnp.float32), spec), np.float64)
            if not np.all(np.isfinite(losses)):
                where = f"{fam.layer_path(i, g.producer)} → {', '.join(cons)}"
                raise ValueError(f"awq: the scale search loss of {where} is not finite: {losses}")
            k = int(np.argmin(losses))
            s = jnp.asarray(cands[k], jnp.float32)
            fold_scale(layer, g, s)
            sc = s[idx]
            grams[key] = grams[key] / (sc[:, None] * sc[None, :])  # the consumers now read x / s
            report["scales"].append({"layer": i, "producer": g.producer, "ratio": ratios[k], "losses": losses})
        if not cfg.clip:
            return
        for rel in matched:
            path, module = fam.layer_path(i, rel), get_module(layer, rel)
            kernel = module.kernel.get_value()
            r = clip_ratios[:1] if skip is not None and skip.fullmatch(path) else clip_ratios
            scale, zero_point, chosen, err, err_rtn = clip_search(kernel, grams[_input_key(rel, all_groups)], r, spec)
            install_weight(layer, rel, path, spec, quantize(kernel, spec, scale=scale, zero_point=zero_point))
            report["clip"].append({"path": path, "clip_ratio": float(jnp.mean(chosen)), "error": float(jnp.sum(err)),
                                   "error_rtn": float(jnp.sum(err_rtn))})  # fmt: skip

    return sequential(model, batches, layer_fn, "awq", progress), report


def check(model, cfg: AWQConfig) -> None:
    """Refuse, before any work, models AWQ cannot run on: no structure map, a pattern matching no linear, packed
    weights or online input transforms (from rotate/duquant: a channel scale does not commute with them)."""
    fam = family_of(model, "awq")
    model = unstack_layers(model)
    found = matched_linears(model, fam, cfg)
    if not found:
        raise ValueError(f"awq: pattern {cfg.pattern!r} matches no linear of the decoder layers ({', '.join(fam.linears)})")
    layers, groups = fam.layers(model), selected_groups(model, fam, cfg.groups)
    touched = set(found) | {(i, c) for i, rel in found for g in groups if rel in g.consumers for c in g.consumers}
    touched |= {(i, g.producer) for i, rel in found for g in groups if rel in g.consumers and g.kind == "linear"}
    for i, rel in sorted(touched, key=lambda t: (t[0], fam.linears.index(t[1]))):  # in execution order
        module, path = get_module(layers[i], rel), fam.layer_path(i, rel)
        if isinstance(module.kernel.get_value(), QArray):
            raise ValueError(f"awq: {path} already holds a packed weight; run awq on the float model")
        if getattr(module, "input_transform", None) is not None:
            raise ValueError(f"awq: {path} has an online input transform (rotate/duquant); a channel scale does not "
                             "commute with it: run awq before those steps")  # fmt: skip


@register("awq", AWQConfig, check=check)
def awq_step(model, cfg: AWQConfig, ctx: Context):
    model, report = awq(model, cfg, ctx.calibration_batches("awq"), ctx.progress)
    if report["scales"]:
        ctx.metrics["awq_ratio_mean"] = float(np.mean([r["ratio"] for r in report["scales"]]))
    if report["clip"]:
        ctx.metrics.update(awq_linears=len(report["clip"]), awq_clip_ratio_mean=float(np.mean([r["clip_ratio"] for r in report["clip"]])))
    return model

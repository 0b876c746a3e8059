"""Outlier Suppression+ (Wei et al. 2023): per-channel shift, then scale, both folded into the model.

Per group and producer channel j: z_j = (max X_j + min X_j)/2 removes the asymmetry (folded with
`fold_shift`: producer bias −= z, consumer bias += z·W; only where producer and consumers have biases,
i.e. LayerNorm families, so never for RMSNorm ones), then s_j = max(1, max|X_j − z_j| / t) scales down
the channels beyond the threshold t (`fold_scale`). t = ratio · max_j max|X_j − z_j| with `ratio`
searched over `ratio_grid` per layer and group, minimising the consumers' output error under fake
quantization (per-token activations, per-channel weights). Exact in float. Sequential, as SmoothQuant.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from qjax.experiments import stats
from qjax.experiments.pipeline import Context, register
from qjax.experiments.smoothquant import check_common, first_consumer_stats, quant_specs, search, selected_groups, sequential, to_producer
from qjax.models.structure import can_shift, family_of, fold_scale, fold_shift, group_width, unstack_layers

RATIO_GRID = [round(0.05 * i, 2) for i in range(1, 21)]
SHIFT_CHOICES = ("auto", "on", "off")


@dataclasses.dataclass
class OSPlusConfig:
    """shift: "auto" (where biases can absorb it), "on" (error if some group cannot), "off".
    ratio_grid: candidate thresholds t = ratio · max|X − z| (ratio in (0, 1]; 1 means no scaling).
    groups: "norms" (norm → linears) or "all" (also v → o, up → down).
    act_bits / weight_bits: fake quantization of the search loss (per-token activations, per-channel weights)."""

    shift: str = "auto"
    ratio_grid: list[float] = dataclasses.field(default_factory=lambda: list(RATIO_GRID))
    groups: str = "all"
    act_bits: int = 8
    weight_bits: int = 8
    min_scale: float = 1e-5  # floor of the threshold t

    def __post_init__(self):
        if self.shift not in SHIFT_CHOICES:
            raise ValueError(f"os_plus: shift must be one of {SHIFT_CHOICES}, got {self.shift!r}")
        if not self.ratio_grid or any(not 0.0 < r <= 1.0 for r in self.ratio_grid):
            raise ValueError(f"os_plus: ratio_grid must be a non-empty list of values in (0, 1], got {self.ratio_grid}")
        check_common(self, "os_plus")


def shift_and_range(lo: np.ndarray, hi: np.ndarray, shift: bool) -> tuple[np.ndarray, np.ndarray]:
    """z = (max + min)/2 (or 0), and max|X − z| per channel."""
    z = (hi + lo) / 2 if shift else np.zeros_like(lo)
    return z, np.maximum(hi - z, z - lo)


def outlier_scale(r: np.ndarray, ratio: float, min_scale: float = 1e-5) -> np.ndarray:
    """s = max(1, r / t) with t = ratio · max(r): channels beyond the threshold are scaled down to it."""
    t = max(ratio * float(r.max()), min_scale)
    return np.maximum(1.0, r / t)


def check(model, cfg: OSPlusConfig) -> None:
    """A structure map is needed; with shift "on", every selected group must have biases to absorb it."""
    fam = family_of(model, "os_plus")
    if cfg.shift != "on":
        return
    layer = fam.layers(unstack_layers(model))[0]
    for g in selected_groups(model, fam, cfg.groups):
        if not can_shift(layer, g):
            raise ValueError(f"os_plus: shift='on' but in family {fam.name!r} the group {g.producer} → {', '.join(g.consumers)} "
                             f"({g.kind}) has no biases to absorb a shift; use shift='auto' or 'off'")  # fmt: skip


def os_plus(model, cfg: OSPlusConfig, batches, progress: bool = False):
    """Shift and scale every layer (returns the model) and a report per (layer, group):
    {"layer", "producer", "shift" (bool), "ratio", "losses" (one per grid value)}."""
    check(model, cfg)
    fam = family_of(model, "os_plus")
    groups = selected_groups(model, fam, cfg.groups)
    specs = quant_specs(cfg.act_bits, cfg.weight_bits)
    report = []

    def transform_layer(i, layer, inputs):
        for g, mm in zip(groups, first_consumer_stats(i, layer, groups, inputs, stats.minmax(), "os_plus"), strict=True):
            width = group_width(layer, g)
            lo, hi = to_producer(mm["min"], g, width, np.minimum), to_producer(mm["max"], g, width)
            shift = cfg.shift != "off" and can_shift(layer, g)
            z, r = shift_and_range(lo, hi, shift)
            scales = [outlier_scale(r, ratio, cfg.min_scale) for ratio in cfg.ratio_grid]
            losses = search(layer, g, inputs, z, scales, specs)
            k = int(np.argmin(losses))
            if shift:
                fold_shift(layer, g, jnp.asarray(z, jnp.float32))
            fold_scale(layer, g, jnp.asarray(scales[k], jnp.float32))
            report.append({"layer": i, "producer": g.producer, "shift": shift, "ratio": cfg.ratio_grid[k], "losses": losses})

    return sequential(model, batches, transform_layer, "os_plus", progress), report


@register("os_plus", OSPlusConfig, check=check)
def os_plus_step(model, cfg: OSPlusConfig, ctx: Context):
    model, report = os_plus(model, cfg, ctx.calibration_batches("os_plus"), ctx.progress)
    ctx.metrics["os_plus_ratio_mean"] = float(np.mean([r["ratio"] for r in report]))
    return model

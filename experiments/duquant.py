"""DuQuant (Lin et al. 2024) as a pipeline step: smoothing folded into the producers, block rotations and a
zigzag permutation applied online to the input of every linear (the math is in `duquant_math`).

Per layer, sequentially (layer i is calibrated on the outputs of layers < i), for each input group (a
producer → consumers group of the structure map; with targets="all" also one group per linear that no
group feeds, e.g. OPT's fc2, whose whole map then runs online):
  1. per-channel max|x| of the consumers' shared input (and, with calib="activations", the mean over the
     calibration windows of that input, (L, C) rows: the reference's `inps.mean(0)` statistic);
  2. x ↦ x Λ⁻¹ R1 P R2 = duquant_map(act max, max_j |W_cj| over all consumers, ...);
  3. Λ is folded exactly into the producer (`fold_scale`); R1 P R2 becomes an online input transform of every
     consumer (`float_op` + `add_input_transform`, the kernels absorb its inverse), so the float function
     is unchanged and a later `quantize` step quantizes the transformed activations and weights.

One jitted pass per layer gives both the statistics (taps on the consumers) and the layer's outputs, the
next layer's inputs; it runs before the layer is transformed, which is exact in float, so these equal the
transformed layer's outputs up to float rounding. (Running the transformed layer again would double the
compute and recompile per layer: its ops carry their paths as static metadata.)

GQA (v_proj → o_proj, `repeat` r > 1): o_proj input channel h·d + k reads v channel (h // r)·d + k, so a
scale folded into v_proj must be equal on the r repeats. Both smoothing statistics (act and weight max)
are therefore reduced by max over the repeats before Λ is computed; the rotations use the true per-channel
o_proj statistic (they run online on o_proj's full input anyway).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qjax.experiments import stats
from qjax.experiments.duquant_math import duquant_map
from qjax.experiments.pipeline import Context, register
from qjax.models.structure import Group, family_of, fold_scale, get_module, group_width, unstack_layers
from qjax.numerics.linear_maps import compose
from qjax.transforms import float_op
from qjax.transforms.nnx_modules import set_child

CALIB = ("absmax", "activations")
TARGETS = ("all", "norms")
ONLINE = "online"  # kind of a group without a producer that could absorb the smoothing


@dataclasses.dataclass
class DuQuantConfig:
    """block: rotation block size (must divide every transformed input width); alpha: smoothing strength;
    steps: greedy steps per rotation; shared: one b×b rotation for all blocks (the reference code) instead
    of one per block (the paper); permute: zigzag permutation between the rotations; smooth: the
    SmoothQuant-style Λ; calib: greedy statistic, "absmax" (smoothed per-channel max|x|) or "activations"
    (smoothed mean calibration rows; the greedy search then costs ~L times more); targets: "all" linear inputs or only the "norms"-fed groups."""

    block: int = 64
    alpha: float = 0.5
    steps: int = 256
    shared: bool = False
    permute: bool = True
    smooth: bool = True
    calib: str = "absmax"
    targets: str = "all"

    def __post_init__(self):
        if self.block < 2:
            raise ValueError(f"duquant: block must be ≥ 2, got {self.block}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"duquant: alpha must lie in [0, 1], got {self.alpha}")
        if self.steps < 0:
            raise ValueError(f"duquant: steps must be ≥ 0, got {self.steps}")
        if self.calib not in CALIB or self.targets not in TARGETS:
            raise ValueError(f"duquant: calib must be one of {CALIB} and targets one of {TARGETS}, got {self.calib!r}, {self.targets!r}")


def input_groups(model, fam, targets: str) -> list[Group]:
    """The groups DuQuant transforms: structure-map groups (norm-fed only for "norms"), and for "all" one
    producer-less group per linear no group feeds."""
    groups = [g for g in fam.groups(model) if targets == "all" or g.kind != "linear"]
    if targets == "norms":
        return groups
    fed = {c for g in groups for c in g.consumers}
    return groups + [Group("", (p,), ONLINE) for p in fam.linears if p not in fed]


def _label(fam, g: Group) -> str:
    """What a group's input width is called in errors."""
    if g.kind in ("rmsnorm", "layernorm"):
        return "hidden size"
    writers = dict(zip(fam.residual_writers, ("attention output width", "intermediate size"), strict=False))
    return writers.get(g.consumers[0], f"{g.consumers[0]} input width")


def check(model, cfg: DuQuantConfig) -> None:
    """A family with a structure map, and a block size dividing every transformed input width."""
    fam = family_of(model, "duquant")
    layers = getattr(model, fam.layers_attr)
    layer = layers if getattr(model.config, "scan_layers", False) else layers[0]  # stacked: kernels (n, in, out)
    widths = {_label(fam, g): get_module(layer, g.consumers[0]).kernel.get_value().shape[-2]
              for g in input_groups(model, fam, cfg.targets)}  # fmt: skip
    bad = [f"{name} {w}" for name, w in widths.items() if w % cfg.block]
    if bad:
        raise ValueError(f"duquant: block {cfg.block} does not divide {', '.join(bad)}")


def _tied(v: np.ndarray, g: Group) -> np.ndarray:
    """`v` (consumer channels) replaced by its max over the consumer channels reading the same producer channel."""
    idx = g.consumer_index(v.size)
    out = np.zeros(idx.max() + 1)
    np.maximum.at(out, idx, v)
    return out[idx]


def _row_sum(length: int) -> stats.Observer:
    """Sum over calibration windows of the (length, features) input rows, and the window count."""
    return stats.Observer(
        lambda f: {"sum": jnp.zeros((length, f), jnp.float32), "count": jnp.zeros((), jnp.float32)},
        lambda s, x: {"sum": s["sum"] + x.reshape(-1, length, x.shape[-1]).astype(jnp.float32).sum(0),
                      "count": s["count"] + x.size // (length * x.shape[-1])},
    )  # fmt: skip


class _Stat(nnx.Variable):
    """An observer's state inside a tap."""


class _Tap(nnx.Module):
    """Folds its module's input into an observer state, then calls the module."""

    def __init__(self, inner: nnx.Module, observer: stats.Observer, features: int):
        self.inner, self.observer = inner, observer
        self.state = _Stat(observer.init(features))

    def __call__(self, x, *args, **kwargs):
        self.state.set_value(self.observer.update(self.state.get_value(), x))
        return self.inner(x, *args, **kwargs)


def observe(layer, xs: list, paths: list[str], observer: stats.Observer, run) -> tuple[dict, list]:
    """Observer states of the inputs of `paths` and the layer's outputs, in one `run(layer, x)` per batch.

    Taps go on a copy of the float layer; every layer's tapped copy has the same graph, so a jitted `run`
    compiles once for all layers.
    """
    tapped = nnx.clone(layer)
    for p in paths:
        inner = get_module(tapped, p)
        set_child(tapped, tuple(p.split(".")), _Tap(inner, observer, inner.kernel.get_value().shape[-2]))
    outs = [run(tapped, x) for x in xs]
    return {p: get_module(tapped, p).state.get_value() for p in paths}, outs


def _float_kernel(layer, rel: str, path: str) -> np.ndarray:
    value = get_module(layer, rel).kernel.get_value()
    if not isinstance(value, jax.Array | np.ndarray):
        raise ValueError(f"duquant: {path} is already quantized; apply DuQuant to the float model")
    return np.asarray(value, np.float64)


def transform_group(layer, fam, i: int, g: Group, st: dict, cfg: DuQuantConfig, key) -> None:
    """Compute the group's DuQuant map from its statistics and deploy it (Λ folded, the rest online)."""
    paths = [fam.layer_path(i, c) for c in g.consumers]
    w = np.max([np.abs(_float_kernel(layer, c, p)).max(1) for c, p in zip(g.consumers, paths, strict=True)], axis=0)
    a = np.asarray(st["absmax"], np.float64)
    calib = a[None] if cfg.calib == "absmax" else np.asarray(stats.mean_of(st["rows"]), np.float64)
    fold = cfg.smooth and g.kind != ONLINE
    if fold and any(getattr(get_module(layer, c), "input_transform", None) is not None for c in g.consumers):
        raise ValueError(f"duquant: {paths} already have an online input transform; apply DuQuant before other transforms")
    a_s, w_s = (_tied(a, g), _tied(w, g)) if fold else (a, w)
    m = duquant_map(a_s, w_s, block=cfg.block, alpha=cfg.alpha, steps=cfg.steps, key=key, shared=cfg.shared,
                    smooth=cfg.smooth, permute=cfg.permute, calib=calib)  # fmt: skip
    if fold:
        scale, m = m.maps[0].scale, compose(*m.maps[1:])
        s = np.ones(group_width(layer, g), np.float32)
        s[g.consumer_index(a.size)] = np.asarray(scale)  # equal on repeats (tied statistics)
        fold_scale(layer, g, jnp.asarray(s))
    shared = None
    for rel, path in zip(g.consumers, paths, strict=True):
        op = float_op(get_module(layer, rel), path)
        set_child(layer, tuple(rel.split(".")), op)
        op.add_input_transform(m)
        if shared is None:
            shared = op.input_transform
        else:  # one stored map per group (q/k/v read the same input): the same variable, counted once
            op.input_transform = shared


@register("duquant", DuQuantConfig, check=check)
def duquant(model, cfg: DuQuantConfig, ctx: Context):
    """DuQuant layer by layer on the calibration windows (see the module docstring)."""
    check(model, cfg)
    model = unstack_layers(model)
    fam = family_of(model, "duquant")
    groups = input_groups(model, fam, cfg.targets)
    batches = [jnp.asarray(b) for b in ctx.calibration_batches("duquant")]
    embedded = [fam.embed(model, b) for b in batches]
    xs, auxes = [x for x, _ in embedded], {x.shape: aux for x, aux in embedded}
    rows = {"rows": _row_sum(batches[0].shape[1])} if cfg.calib == "activations" else {}
    observer = stats.combine(absmax=stats.absmax(), bad=stats.nonfinite(), **rows)  # max may skip NaN: count them
    run = nnx.jit(lambda layer, x: fam.call_layer(layer, x, auxes[x.shape]))  # shapes are static under jit
    for i, layer in enumerate(tqdm(fam.layers(model), desc=f"{ctx.label}: duquant", disable=not ctx.progress, unit="layer")):
        st, xs = observe(layer, xs, [g.consumers[0] for g in groups], observer, run)
        bad = {p: int(v["bad"]) for p, v in st.items() if v["bad"]}
        if bad:
            raise ValueError(f"duquant (layer {i}): non-finite (NaN/Inf) inputs on the calibration data, count per module: {bad}")
        for k, g in enumerate(groups):
            transform_group(layer, fam, i, g, st[g.consumers[0]], cfg, jax.random.fold_in(ctx.key, i * len(groups) + k))
    return model

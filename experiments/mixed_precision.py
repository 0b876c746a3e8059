"""Mixed-precision weights under a memory budget: score the units, allocate a width per unit, quantize.

Units are decoder layers (`unit: layer`, all linears of a layer share one weight spec) or single
linears (`unit: linear`). Every option (a weight spec such as int2 g64 asym, int3 g128, int4 g128,
int8 channel) has an exact byte cost per unit: the packed QArray's `nbytes` of each kernel (computed
from shapes alone with `jax.eval_shape`, so it is the real storage for every width: 3/5/6/7-bit codes
are packed densely) plus the float bias bytes, i.e. exactly what `qjax.param_bytes` reports for the
quantized linears. A budget is `avg_bits` (bits per parameter of those linears) or `budget_mb` (1e6 bytes).

Scores (one importance per unit; higher = keep wider):
  lim          Layer-wise quantization (arXiv 2406.17415): LIM = mean over calibration tokens of
               1 − cos(layer input, layer output) (a layer that changes its input more matters more);
               a linear unit takes its layer's score.
  reverse_lim  −LIM (the control: the most important units get the low width first).
  zd           fraction of the unit's kernel weights (pooled) with |z-score| > 1 (population std).
  sensitivity  loss increase on the calibration windows when only that unit is (fake-)quantized with an
               option and everything else stays float; the importance is the increase at the lowest option.
  uniform      every unit equal (greedy lowers all units round-robin: as uniform as the budget allows).

Allocators:
  greedy    start at the widest option, lower the least important unit one level at a time until the
            budget is met (so the least important units reach the lowest width first, as in the paper),
            then raise the most important units while the budget allows. Ends maximal: no unit can go up
            one level without exceeding the budget.
  knapsack  `allocate`: exact multiple-choice knapsack maximising Σ value[u][level] (sensitivity:
            −loss increase; other scores: importance rank × bits per parameter of the option).
  evo       EvoPress (arXiv 2410.14649): (1+λ) search from the greedy allocation with level-switch
            mutations (one unit up, another down, repaired to the budget), fitness = KL divergence of the
            fake-quantized model's next-token distribution to the float model's; offspring are screened on
            a few random calibration windows, the best `evo_survivors` are re-scored on all of them, and the
            best replaces the parent only if it is no worse there (elitist: the fitness never increases).

The result is a list of per-linear rules ({pattern: escaped path, weight: spec}), recorded in ctx.metrics
(`mixed_precision_rules`) and written to `<workdir>/mixed_precision.yaml` as a `quantize` step entry, and the
model quantized with them (weights only, ptq). Embeddings and the head stay as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from tqdm.auto import tqdm

import qjax
from qjax.experiments.config import RuleConfig, SpecConfig
from qjax.experiments.pipeline import Context, register
from qjax.experiments.smoothquant import sequential
from qjax.models.structure import FamilyMap, family_of, get_module, unstack_layers
from qjax.numerics import QArray, QuantSpec
from qjax.numerics.quantize import quantize, quantize_dequantize

STEP = "mixed_precision"
UNITS = ("layer", "linear")
SCORES = ("lim", "zd", "sensitivity", "reverse_lim", "uniform")
ALLOCATORS = ("greedy", "knapsack", "evo")


@dataclasses.dataclass
class MixedPrecisionConfig:
    """options: candidate weight specs (any order; sorted by total size). unit: "layer" or "linear".
    score / allocator: see the module docstring. Exactly one of avg_bits (bits per parameter of the decoder
    linears, biases included) and budget_mb (1e6 bytes). calibration_windows: how many calibration windows
    the scores and the evo fitness use (None: all). knapsack_cells: the most budget cells of the DP.
    evo_*: generations, offspring per generation (λ), offspring re-scored on all windows, windows that
    screen the offspring (None: a quarter of them, at least one)."""

    options: list[SpecConfig]
    unit: str = "layer"
    score: str = "lim"
    allocator: str = "greedy"
    avg_bits: float | None = None
    budget_mb: float | None = None
    calibration_windows: int | None = None
    knapsack_cells: int = 1 << 16
    evo_generations: int = 20
    evo_offspring: int = 8
    evo_survivors: int = 2
    evo_screen_windows: int | None = None

    def __post_init__(self):
        self.options = [o if isinstance(o, SpecConfig) else SpecConfig(**o) for o in self.options]
        if not self.options:
            raise ValueError(f"{STEP}: options must list at least one weight spec")
        if len({repr(o) for o in self.options}) != len(self.options):
            raise ValueError(f"{STEP}: options repeat a weight spec: {[option_name(o) for o in self.options]}")
        if any(o.rounding != "nearest" for o in self.options):
            raise ValueError(f"{STEP}: options must round to nearest (stochastic rounding needs a key per call)")
        for name, value, allowed in (("unit", self.unit, UNITS), ("score", self.score, SCORES), ("allocator", self.allocator, ALLOCATORS)):
            if value not in allowed:
                raise ValueError(f"{STEP}: {name} must be one of {allowed}, got {value!r}")
        if (self.avg_bits is None) == (self.budget_mb is None):
            raise ValueError(f"{STEP}: give exactly one of avg_bits and budget_mb, got avg_bits={self.avg_bits}, "
                             f"budget_mb={self.budget_mb}")
        if not (self.avg_bits if self.avg_bits is not None else self.budget_mb) > 0:
            raise ValueError(f"{STEP}: the budget must be positive, got {self.budget_text()}")
        positive = dict(knapsack_cells=self.knapsack_cells, evo_offspring=self.evo_offspring, evo_survivors=self.evo_survivors,
                        calibration_windows=self.calibration_windows, evo_screen_windows=self.evo_screen_windows)  # fmt: skip
        bad = [f"{k}={v}" for k, v in positive.items() if v is not None and v < 1]
        if bad:
            raise ValueError(f"{STEP}: {', '.join(bad)} must be ≥ 1")
        if self.evo_generations < 0:
            raise ValueError(f"{STEP}: evo_generations must be ≥ 0, got {self.evo_generations}")
        if self.evo_survivors > self.evo_offspring:
            raise ValueError(f"{STEP}: evo_survivors ({self.evo_survivors}) must not exceed evo_offspring ({self.evo_offspring})")

    def budget_bytes(self, params: int) -> int:
        """The budget in bytes, rounded down: avg_bits · params / 8, or budget_mb · 1e6."""
        return math.floor(self.avg_bits * params / 8) if self.avg_bits is not None else math.floor(self.budget_mb * 1e6)

    def budget_text(self) -> str:
        return f"avg_bits={self.avg_bits}" if self.avg_bits is not None else f"budget_mb={self.budget_mb}"

    def needs_data(self) -> bool:
        return self.score in ("lim", "reverse_lim", "sensitivity") or self.allocator == "evo"


def option_name(o: SpecConfig) -> str:
    """A short label: int4/g128/asym, int8/channel."""
    gran = f"g{o.group_size}" if o.granularity == "group" else o.granularity
    return f"{o.format}/{gran}" + ("" if o.symmetric else "/asym")


# ---- units and their exact costs ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
    """One allocation unit: a decoder layer's linears, or a single linear (model paths)."""

    name: str
    layer: int
    paths: tuple[str, ...]


def make_units(fam: FamilyMap, n_layers: int, unit: str) -> list[Unit]:
    """Per layer (all of its linears) or per linear, in layer and execution order."""
    if unit == "layer":
        return [Unit(fam.layer_path(i), i, tuple(fam.layer_path(i, r) for r in fam.linears)) for i in range(n_layers)]
    return [Unit(fam.layer_path(i, r), i, (fam.layer_path(i, r),)) for i in range(n_layers) for r in fam.linears]


def _array_bytes(x) -> int:
    return 0 if x is None else math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def _bias(module):
    bias = getattr(module, "bias", None)
    return bias.get_value() if hasattr(bias, "get_value") else bias


@functools.cache
def packed_nbytes(shape: tuple[int, ...], dtype: str, spec: QuantSpec) -> int:
    """`quantize(x, spec).nbytes` for an x of this shape and dtype, from shapes alone (`jax.eval_shape`)."""
    return jax.eval_shape(functools.partial(quantize, spec=spec), jax.ShapeDtypeStruct(shape, dtype)).nbytes


def linear_cost(module, spec: QuantSpec) -> int:
    """Bytes the linear holds with its kernel packed by `spec`: the packed QArray's nbytes + the float bias."""
    kernel = module.kernel.get_value()
    return packed_nbytes(tuple(kernel.shape), jnp.dtype(kernel.dtype).name, spec) + _array_bytes(_bias(module))


def linear_params(module) -> int:
    """Kernel and bias elements of a linear."""
    bias = _bias(module)
    return math.prod(module.kernel.get_value().shape) + (0 if bias is None else math.prod(bias.shape))


def unit_costs(model, units: list[Unit], specs: list[QuantSpec]) -> np.ndarray:
    """(units, options) int64 bytes."""
    return np.array([[sum(linear_cost(get_module(model, p), s) for p in u.paths) for s in specs] for u in units], np.int64)


def sort_options(costs: np.ndarray, options: list[SpecConfig], units: list[Unit]) -> tuple[np.ndarray, list[SpecConfig]]:
    """Options ordered by total size (level 0 = smallest); every unit's cost must not decrease with the level."""
    order = np.argsort(costs.sum(0), kind="stable")
    costs, options = costs[:, order], [options[i] for i in order]
    for u, row in enumerate(costs):
        bad = np.flatnonzero(np.diff(row) < 0)
        if bad.size:
            k = int(bad[0])
            raise ValueError(f"{STEP}: on {units[u].name}, {option_name(options[k])} costs {row[k]} bytes but the larger "
                             f"option {option_name(options[k + 1])} only {row[k + 1]}; choose options whose sizes rank the "
                             "same on every unit")  # fmt: skip
    return costs, options


def check_budget(budget: int, costs: np.ndarray, params: int, cfg: MixedPrecisionConfig, lowest: SpecConfig) -> None:
    """A budget below the all-lowest configuration is an error naming both numbers."""
    minimum = int(costs[:, 0].sum())
    if budget < minimum:
        raise ValueError(f"{STEP}: the budget {cfg.budget_text()} ({budget} bytes, {8 * budget / params:.3f} bits per parameter) "
                         f"is below the all-lowest configuration ({option_name(lowest)} everywhere: {minimum} bytes, "
                         f"{8 * minimum / params:.3f} bits per parameter)")  # fmt: skip


# ---- scores -------------------------------------------------------------------------------------------------


def cosine_gap_sum(x: jax.Array, y: jax.Array) -> tuple[jax.Array, int]:
    """Σ over tokens of 1 − cos(x_t, y_t) (float32; zero vectors count as cos 0) and the token count."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    y = y.reshape(-1, y.shape[-1]).astype(jnp.float32)
    norms = jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1)
    cos = jnp.sum(x * y, -1) / jnp.maximum(norms, 1e-30)
    return jnp.sum(1.0 - cos), x.shape[0]


def lim_scores(model, batches: list[np.ndarray], progress: bool = False) -> np.ndarray:
    """Per decoder layer: mean over calibration tokens of 1 − cos(layer input, layer output) (float model)."""
    scores = []
    call = nnx.jit(family_of(model, STEP).call_layer)

    def score_layer(i, layer, inputs):
        total, count = 0.0, 0
        for h in inputs.hidden:
            s, n = cosine_gap_sum(h, call(layer, h, inputs.aux[tuple(h.shape[:2])]))
            total, count = total + float(s), count + n
        scores.append(total / count)

    sequential(model, batches, score_layer, f"{STEP}: LIM", progress)
    return np.array(scores)


def zd_score(kernels: list) -> float:
    """Fraction of the weights (pooled over `kernels`) whose |z-score| exceeds 1 (mean and population std of the pool)."""
    w = np.concatenate([np.asarray(k, np.float64).ravel() for k in kernels])
    std = w.std()
    return 0.0 if std == 0 else float(np.mean(np.abs(w - w.mean()) > std))


def zd_scores(model, units: list[Unit]) -> np.ndarray:
    """ZD of every unit, pooled over its kernels."""
    return np.array([zd_score([get_module(model, p).kernel.get_value() for p in u.paths]) for u in units])


def sensitivities(model_eval: FakeQuantModel, n_units: int, progress: bool = False) -> np.ndarray:
    """(units, options): calibration loss increase with only that unit quantized at that option (the rest float)."""
    levels = np.full(n_units, model_eval.float_level)
    base = model_eval.nll(levels)
    out = np.zeros((n_units, model_eval.float_level))
    for u in tqdm(range(n_units), desc=f"{STEP}: sensitivity", disable=not progress, unit="unit"):
        for o in range(model_eval.float_level):
            out[u, o] = model_eval.nll(np.where(np.arange(n_units) == u, o, levels)) - base
    return out


def rank(scores: np.ndarray) -> np.ndarray:
    """Dense ranks from 1 (lowest score); equal scores share a rank."""
    return np.unique(scores, return_inverse=True)[1].reshape(-1) + 1.0


# ---- allocators (pure numpy) --------------------------------------------------------------------------------


def total_cost(costs: np.ndarray, levels: np.ndarray) -> int:
    return int(costs[np.arange(len(levels)), levels].sum())


def greedy(costs: np.ndarray, importance: np.ndarray, budget: int) -> np.ndarray:
    """Lower the least important unit one level at a time (ties: the widest first, then the first unit) until
    the total fits `budget`; then raise the most important units one level while the budget allows."""
    n, k = costs.shape
    levels = np.full(n, k - 1)
    total = total_cost(costs, levels)
    while total > budget:
        lowerable = [u for u in range(n) if levels[u] > 0]
        if not lowerable:
            raise ValueError(f"{STEP}: budget {budget} bytes is below the all-lowest configuration ({total} bytes)")
        u = min(lowerable, key=lambda u: (importance[u], -levels[u], u))
        total -= int(costs[u, levels[u]] - costs[u, levels[u] - 1])
        levels[u] -= 1
    raised = True
    while raised:
        raised = False
        for u in sorted(range(n), key=lambda u: (-importance[u], levels[u], u)):
            if levels[u] < k - 1 and total + costs[u, levels[u] + 1] - costs[u, levels[u]] <= budget:
                total += int(costs[u, levels[u] + 1] - costs[u, levels[u]])
                levels[u] += 1
                raised = True
                break
    return levels


def allocate(costs, values, budget_bytes: int, max_cells: int = 1 << 16) -> np.ndarray:
    """Exact multiple-choice knapsack: one option per unit, Σ cost ≤ budget, Σ value maximal. Returns the levels.

    Each unit's cheapest option is taken as its base (cost 0), leaving capacity C = budget − Σ base. The DP
    runs over a grid of q bytes: q = the gcd of all extra costs when C/q fits in `max_cells` (then exact:
    Σ extra ≤ C ⟺ Σ extra/q ≤ ⌊C/q⌋), else q = ⌈C / max_cells⌉ with costs rounded up and C rounded down,
    which can only forgo solutions (within n·q bytes of the budget) and never exceeds the budget.
    """
    costs, values = np.asarray(costs, np.int64), np.asarray(values, np.float64)
    n, k = costs.shape
    base = costs.min(1)
    cap = int(budget_bytes - base.sum())
    if cap < 0:
        raise ValueError(f"{STEP}: budget {budget_bytes} bytes is below the cheapest configuration ({int(base.sum())} bytes)")
    extra = costs - base[:, None]
    q = int(np.gcd.reduce(extra[extra > 0])) if np.any(extra > 0) else 1
    if cap // q > max_cells:
        q = -(-cap // max_cells)
    weights, cells = -(-extra // q), cap // q
    best = np.zeros(cells + 1)
    choice = np.zeros((n, cells + 1), np.int32)
    for u in range(n):
        cand = np.full((k, cells + 1), -np.inf)
        for o in range(k):
            w = int(weights[u, o])
            if w <= cells:
                cand[o, w:] = best[: cells + 1 - w] + values[u, o]
        choice[u] = np.argmax(cand, 0)
        best = cand[choice[u], np.arange(cells + 1)]
    levels, c = np.zeros(n, np.int64), cells
    for u in reversed(range(n)):
        levels[u] = choice[u, c]
        c -= int(weights[u, levels[u]])
    return levels


def mutate(levels: np.ndarray, costs: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray | None:
    """Level switch: one unit up, another down; while over budget, lower further random units (not the raised
    one). None when no switch is possible or no repair fits."""
    n, k = costs.shape
    ups = np.flatnonzero(levels < k - 1)
    if ups.size == 0:
        return None
    a = int(rng.choice(ups))
    downs = np.flatnonzero((levels > 0) & (np.arange(n) != a))
    if downs.size == 0:
        return None
    child = levels.copy()
    child[a] += 1
    child[int(rng.choice(downs))] -= 1
    while total_cost(costs, child) > budget:
        lowerable = np.flatnonzero((child > 0) & (np.arange(n) != a))
        if lowerable.size == 0:
            return None
        child[int(rng.choice(lowerable))] -= 1
    return child


def evo_search(start: np.ndarray, costs: np.ndarray, budget: int, fitness: Callable[[np.ndarray, np.ndarray], float], n_windows: int,
               key: jax.Array, generations: int, offspring: int, survivors: int, screen_windows: int,
               progress: bool = False) -> tuple[np.ndarray, list[float]]:  # fmt: skip
    """(1+λ) search (EvoPress). `fitness(levels, window indices)` (lower is better). Returns the best levels
    and the parent's fitness on all windows after every generation (non-increasing)."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    everything = np.arange(n_windows)
    memo: dict[tuple, float] = {}

    def fit(levels, windows):
        k = (tuple(levels.tolist()), tuple(windows.tolist()))
        if k not in memo:
            memo[k] = float(fitness(levels, windows))
        return memo[k]

    parent = np.asarray(start).copy()
    history = [fit(parent, everything)]
    for _ in tqdm(range(generations), desc=f"{STEP}: evo", disable=not progress, unit="gen"):
        children, seen = [], {tuple(parent.tolist())}
        for _ in range(10 * offspring):
            child = mutate(parent, costs, budget, rng)
            if child is not None and tuple(child.tolist()) not in seen:
                seen.add(tuple(child.tolist()))
                children.append(child)
            if len(children) == offspring:
                break
        if not children:
            break
        screen = np.sort(rng.choice(n_windows, min(screen_windows, n_windows), replace=False))
        shortlist = sorted(range(len(children)), key=lambda i: fit(children[i], screen))[:survivors]
        best = min(shortlist, key=lambda i: fit(children[i], everything))
        if fit(children[best], everything) <= history[-1]:
            parent = children[best]
        history.append(fit(parent, everything))
    return parent, history


# ---- the fake-quantized model (scores and fitness) -----------------------------------------------------------


class FakeQuantModel:
    """Logits with each unit's kernels fake-quantized at its level (level len(specs): float), compiled once for
    every allocation (a `lax.switch` per kernel); losses and KL over chosen calibration windows."""

    def __init__(self, model, units: list[Unit], specs: list[QuantSpec], windows: np.ndarray, batch_size: int):
        self.windows, self.batch_size, self.float_level = np.asarray(windows), batch_size, len(specs)
        graphdef, self.state = nnx.split(model)
        branches = tuple(functools.partial(quantize_dequantize, spec=s) for s in specs) + (lambda w: w,)

        def logits(state, levels, ids):
            m = nnx.merge(graphdef, state)
            for u, unit in enumerate(units):
                for path in unit.paths:
                    var = get_module(m, path).kernel
                    var.set_value(jax.lax.switch(levels[u], branches, var.get_value()))
            return m(ids).astype(jnp.float32)

        def nll_sum(state, levels, ids):
            logp = jax.nn.log_softmax(logits(state, levels, ids)[:, :-1])
            return -jnp.sum(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

        def kl_sum(state, levels, ids):
            p = jax.nn.log_softmax(nnx.merge(graphdef, state)(ids).astype(jnp.float32))
            q = jax.nn.log_softmax(logits(state, levels, ids))
            return jnp.sum(jnp.exp(p) * (p - q))

        self._nll, self._kl = jax.jit(nll_sum), jax.jit(kl_sum)

    def _mean(self, fn, levels, windows, per_window: int) -> float:
        idx = np.arange(len(self.windows)) if windows is None else np.asarray(windows)
        lv = jnp.asarray(levels, jnp.int32)
        total = sum(float(fn(self.state, lv, jnp.asarray(self.windows[idx[i : i + self.batch_size]])))
                    for i in range(0, len(idx), self.batch_size))  # fmt: skip
        return total / (len(idx) * per_window)

    def nll(self, levels, windows=None) -> float:
        """Mean next-token NLL over the windows."""
        return self._mean(self._nll, levels, windows, self.windows.shape[1] - 1)

    def kl(self, levels, windows=None) -> float:
        """Mean over token positions of KL(float model ‖ quantized model) of the next-token distributions."""
        return self._mean(self._kl, levels, windows, self.windows.shape[1])


# ---- the step -----------------------------------------------------------------------------------------------


def allocation_rules(units: list[Unit], levels: np.ndarray, options: list[SpecConfig]) -> list[RuleConfig]:
    """One rule per linear: its escaped path and its unit's weight spec."""
    return [RuleConfig(pattern=re.escape(p), weight=options[int(lv)]) for u, lv in zip(units, levels, strict=True) for p in u.paths]


def rule_dicts(rules: list[RuleConfig]) -> list[dict]:
    """Plain RuleConfig-compatible dicts (for YAML and metrics)."""
    return [{"pattern": r.pattern, "weight": dataclasses.asdict(r.weight)} for r in rules]


def write_rules(workdir: str, rules: list[dict], header: str) -> str:
    """`<workdir>/mixed_precision.yaml`: a `quantize` step entry with the rules (paste into a recipe's steps)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "mixed_precision.yaml")
    with open(path, "w") as f:
        f.write("".join(f"# {line}\n" for line in header.splitlines()))
        yaml.safe_dump({"quantize": {"rules": rules}}, f, sort_keys=False)
    return path


def plan(model, cfg: MixedPrecisionConfig) -> tuple[list[Unit], np.ndarray, list[SpecConfig], np.ndarray, int]:
    """(units, costs (units, options) sorted by size, options in that order, parameters per unit, budget bytes);
    errors for packed kernels, inconsistent options and too-small budgets, before any calibration work."""
    fam = family_of(model, STEP)
    model = unstack_layers(model)
    units = make_units(fam, len(fam.layers(model)), cfg.unit)
    for p in (p for u in units for p in u.paths):
        if isinstance(get_module(model, p).kernel.get_value(), QArray):
            raise ValueError(f"{STEP}: {p} already holds a packed weight; allocate widths on the float model")
    costs, options = sort_options(unit_costs(model, units, [o.to_spec("weight") for o in cfg.options]), list(cfg.options), units)
    params = np.array([sum(linear_params(get_module(model, p)) for p in u.paths) for u in units], np.int64)
    budget = cfg.budget_bytes(int(params.sum()))
    check_budget(budget, costs, int(params.sum()), cfg, options[0])
    return units, costs, options, params, budget


def check(model, cfg: MixedPrecisionConfig) -> None:
    """Family, float kernels, option sizes and the budget, checked before any work."""
    plan(model, cfg)


def importance_and_values(model, cfg: MixedPrecisionConfig, units: list[Unit], costs: np.ndarray, params: np.ndarray,
                          batches: list[np.ndarray], evaluator: FakeQuantModel | None,
                          progress: bool) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per-unit importance (greedy order) and per-(unit, option) knapsack values."""
    if cfg.score == "sensitivity":
        delta = sensitivities(evaluator, len(units), progress)
        return delta[:, 0], -delta
    if cfg.score in ("lim", "reverse_lim"):
        lim = lim_scores(model, batches, progress)[[u.layer for u in units]]
        importance = lim if cfg.score == "lim" else -lim
    elif cfg.score == "zd":
        importance = zd_scores(model, units)
    else:
        importance = np.zeros(len(units))
    bits = 8.0 * costs / params[:, None]
    return importance, rank(importance)[:, None] * bits


def summary(cfg: MixedPrecisionConfig, levels: np.ndarray, options: list[SpecConfig], total: int, budget: int, params: int) -> str:
    """The YAML file's header: settings, bytes against the budget, units per option."""
    counts = ", ".join(f"{option_name(o)}: {int(np.sum(levels == i))}" for i, o in enumerate(options))
    return (f"{STEP}: unit {cfg.unit}, score {cfg.score}, allocator {cfg.allocator}, {cfg.budget_text()}\n"
            f"{total} of {budget} bytes ({8 * total / params:.3f} bits per parameter); units per option: {counts}")  # fmt: skip


@register(STEP, MixedPrecisionConfig, check=check)
def mixed_precision_step(model, cfg: MixedPrecisionConfig, ctx: Context):
    model = unstack_layers(model)
    units, costs, options, params, budget = plan(model, cfg)
    windows = ctx.require("calibration", STEP)[: cfg.calibration_windows] if cfg.needs_data() else None
    batches = [] if windows is None else [windows[i : i + ctx.batch_size] for i in range(0, len(windows), ctx.batch_size)]
    evaluator = None
    if cfg.score == "sensitivity" or cfg.allocator == "evo":
        evaluator = FakeQuantModel(model, units, [o.to_spec("weight") for o in options], windows, ctx.batch_size)
    importance, values = importance_and_values(model, cfg, units, costs, params, batches, evaluator, ctx.progress)
    if cfg.allocator == "knapsack":
        levels = allocate(costs, values, budget, cfg.knapsack_cells)
    else:
        levels = greedy(costs, importance, budget)
    if cfg.allocator == "evo":
        screen = cfg.evo_screen_windows or max(1, len(windows) // 4)
        levels, history = evo_search(levels, costs, budget, evaluator.kl, len(windows), ctx.key, cfg.evo_generations,
                                     cfg.evo_offspring, cfg.evo_survivors, screen, ctx.progress)  # fmt: skip
        ctx.metrics.update(mixed_precision_evo_kl_first=history[0], mixed_precision_evo_kl_last=history[-1],
                           mixed_precision_evo_generations=len(history) - 1)  # fmt: skip
    rules = allocation_rules(units, levels, options)
    total, n_params = total_cost(costs, levels), int(params.sum())
    ctx.metrics.update(mixed_precision_avg_bits=8 * total / n_params, mixed_precision_bytes=total,
                       mixed_precision_budget_bytes=budget, mixed_precision_rules=rule_dicts(rules))  # fmt: skip
    if ctx.workdir:
        write_rules(ctx.workdir, rule_dicts(rules), summary(cfg, levels, options, total, budget, n_params))
    return qjax.quantize(model, qjax.Recipe(tuple(r.to_rule() for r in rules), strict=True), "ptq")

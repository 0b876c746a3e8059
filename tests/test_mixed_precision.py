"""Mixed-precision allocation: exact costs, scores against numpy, knapsack against brute force, budgets, EvoPress."""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

import qjax
from qjax.experiments import mixed_precision as mp
from qjax.experiments.config import SpecConfig
from qjax.experiments.pipeline import Context, PrefixCache, Step, prefix_keys, run_steps
from qjax.experiments.schema import ConfigError
from qjax.models.llama import LlamaConfig, LlamaForCausalLM
from qjax.models.structure import family_of, get_module
from qjax.numerics.quantize import quantize
from qjax.transforms import quantized_ops

V = 97
CAL = np.random.default_rng(1).integers(0, V, (8, 16))
BATCHES = [CAL[:4], CAL[4:]]
OPTIONS = [
    dict(format="int2", granularity="group", group_size=32, symmetric=False),
    dict(format="int3", granularity="group", group_size=64),
    dict(format="int4", granularity="group", group_size=32),
    dict(format="int8", granularity="channel"),
]


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2)
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))


def config(**kw) -> mp.MixedPrecisionConfig:
    return mp.MixedPrecisionConfig(**{"options": OPTIONS, **kw})


def linear_bytes(model) -> int:
    """qjax.param_bytes of the decoder layers' quantized linears."""
    return sum(qjax.param_bytes(op) for path, op in quantized_ops(model).items() if path.startswith("layers."))


def real_nbytes(kernel, spec) -> int:
    """nbytes of the QArray that `quantize` really returns (jitted: the eager op-by-op path is slow)."""
    return jax.jit(quantize, static_argnums=1)(kernel, spec).nbytes


def levels_of(rules: list[dict], units, options) -> np.ndarray:
    """Each unit's option index, read back from the rules (one spec per unit)."""
    by_path = {r["pattern"].replace("\\", ""): SpecConfig(**r["weight"]) for r in rules}
    found = [{options.index(by_path[p]) for p in u.paths} for u in units]
    assert all(len(f) == 1 for f in found)
    return np.array([f.pop() for f in found])


def brute_force(costs, values, budget):
    best = -np.inf
    for combo in itertools.product(*(range(costs.shape[1]) for _ in range(costs.shape[0]))):
        idx = np.array(combo)
        if costs[np.arange(len(idx)), idx].sum() <= budget:
            best = max(best, values[np.arange(len(idx)), idx].sum())
    return best


# ---- allocators -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_equals_brute_force_and_never_exceeds_the_budget(seed):
    rng = np.random.default_rng(seed)
    n, k = rng.integers(1, 6), rng.integers(1, 5)
    costs = rng.integers(1, 60, (n, k)) * rng.choice([1, 3, 7])  # sizes need not rank the same on every unit
    values = rng.normal(size=(n, k))
    budget = int(rng.integers(costs.min(1).sum(), costs.max(1).sum() + 5))
    levels = mp.allocate(costs, values, budget)
    assert mp.total_cost(costs, levels) <= budget
    np.testing.assert_allclose(values[np.arange(n), levels].sum(), brute_force(costs, values, budget), atol=1e-9)
    coarse = mp.allocate(costs, values, budget, max_cells=3)  # a coarse grid: conservative, never over budget
    assert mp.total_cost(costs, coarse) <= budget
    assert values[np.arange(n), coarse].sum() <= brute_force(costs, values, budget) + 1e-9


@pytest.mark.parametrize("seed", range(20))
def test_greedy_meets_the_budget_within_one_step_in_importance_order(seed):
    rng = np.random.default_rng(seed)
    n, k = rng.integers(2, 9), rng.integers(2, 5)
    row = np.cumsum(rng.integers(1, 50, k))
    costs = np.tile(row, (n, 1))  # layer units: the same sizes everywhere
    importance = rng.permutation(n).astype(float)
    budget = int(rng.integers(costs[:, 0].sum(), costs[:, -1].sum() + 1))
    levels = mp.greedy(costs, importance, budget)
    total = mp.total_cost(costs, levels)
    assert total <= budget
    assert all(total + costs[u, levels[u] + 1] - costs[u, levels[u]] > budget for u in range(n) if levels[u] < k - 1)  # maximal
    by_importance = levels[np.argsort(importance)]
    assert np.all(np.diff(by_importance) >= 0), (importance, levels)  # the low widths go to the least important units
    with pytest.raises(ValueError, match="below the all-lowest"):
        mp.greedy(costs, importance, int(costs[:, 0].sum()) - 1)


def test_uniform_scores_spread_the_budget_round_robin():
    costs = np.tile([10, 20, 40], (5, 1))
    levels = mp.greedy(costs, np.zeros(5), 5 * 20 + 20)  # all at the middle level plus one unit's step up
    assert sorted(levels.tolist()) == [1, 1, 1, 1, 2]


def test_mutation_is_a_level_switch_repaired_to_the_budget():
    rng = np.random.default_rng(0)
    costs = np.array([[1, 2, 4], [1, 3, 9], [2, 4, 6], [1, 2, 3]])
    budget = 12
    for _ in range(200):
        start = mp.greedy(costs, rng.normal(size=4), budget)
        child = mp.mutate(start, costs, budget, rng)
        if child is None:
            continue
        assert mp.total_cost(costs, child) <= budget and np.all((child >= 0) & (child < 3))
        assert np.sum(child > start) == 1 and np.sum(child < start) >= 1


def test_evo_search_is_elitist_and_respects_the_budget():
    rng = np.random.default_rng(3)
    costs = np.tile([10, 16, 26, 50], (8, 1))
    budget = 8 * 26
    target = rng.normal(size=(8, 4))
    evaluated = []

    def fitness(levels, windows):  # a noisy screen on few windows, exact on all of them
        evaluated.append(mp.total_cost(costs, levels))
        return float(target[np.arange(8), levels].sum() + (0.5 * rng.normal() if len(windows) < 16 else 0.0))

    start = mp.greedy(costs, np.zeros(8), budget)
    best, history = mp.evo_search(start, costs, budget, fitness, 16, jax.random.key(0), 30, 6, 2, 4)
    assert all(b <= a for a, b in zip(history, history[1:], strict=False)), history
    assert history[-1] < history[0] and np.isclose(history[-1], target[np.arange(8), best].sum())
    assert max(evaluated) <= budget and mp.total_cost(costs, best) <= budget
    again, _ = mp.evo_search(start, costs, budget, lambda lv, w: float(target[np.arange(8), lv].sum()), 16, jax.random.key(0), 30, 6, 2, 4)
    first, _ = mp.evo_search(start, costs, budget, lambda lv, w: float(target[np.arange(8), lv].sum()), 16, jax.random.key(0), 30, 6, 2, 4)
    np.testing.assert_array_equal(again, first)  # the key decides everything


# ---- costs and scores on a tiny Llama --------------------------------------------------------------------------


def test_costs_are_the_packed_qarray_sizes(model):
    units, costs, options, params, _ = mp.plan(model, config(avg_bits=4.0, unit="linear"))
    assert [mp.option_name(o) for o in options] == ["int2/g32/asym", "int3/g64", "int4/g32", "int8/channel"]
    for u, unit in enumerate(units[:7]):  # layer 0's linears (every layer has the same shapes)
        (path,) = unit.paths
        kernel = get_module(model, path).kernel.get_value()
        assert params[u] == kernel.size
        assert list(costs[u]) == [real_nbytes(kernel, o.to_spec("weight")) for o in options]
    # int3 codes are packed densely: 3 bits per weight plus one float32 scale per 64 weights
    assert costs[0, 1] == 64 * 64 * 3 // 8 + 64 * 4


def test_lim_equals_numpy_on_captured_layer_inputs_and_outputs(model):
    fam = family_of(model)
    gaps = [[] for _ in model.layers]
    for b in BATCHES:
        x, aux = fam.embed(model, jnp.asarray(b))
        for i, layer in enumerate(model.layers):
            y = layer(x, *aux)
            xs, ys = np.asarray(x, np.float64).reshape(-1, 64), np.asarray(y, np.float64).reshape(-1, 64)
            cos = np.sum(xs * ys, 1) / (np.linalg.norm(xs, axis=1) * np.linalg.norm(ys, axis=1))
            gaps[i].extend(1.0 - cos)
            x = y
    expected = np.array([np.mean(g) for g in gaps])
    got = mp.lim_scores(model, BATCHES)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.ptp(got) > 1e-3  # the layers differ: the order is not a tie


def test_zd_equals_numpy_on_the_kernels(model):
    fam = family_of(model)
    for unit in ("layer", "linear"):
        units = mp.make_units(fam, 4, unit)
        got = mp.zd_scores(model, units)
        for u, score in zip(units, got, strict=True):
            w = np.concatenate([np.asarray(get_module(model, p).kernel.get_value(), np.float64).ravel() for p in u.paths])
            assert score == pytest.approx(np.mean(np.abs((w - w.mean()) / w.std()) > 1), abs=1e-12)
    heavy = np.r_[np.zeros(90), np.full(10, 5.0)]  # 10% outliers: their |z| = 3, the rest 1/3
    assert mp.zd_score([heavy]) == pytest.approx(0.1)


def test_sensitivity_equals_the_loss_of_the_really_quantized_model(model):
    units, costs, options, params, _ = mp.plan(model, config(avg_bits=4.0))
    specs = [o.to_spec("weight") for o in options]
    ev = mp.FakeQuantModel(model, units, specs, CAL, 4)
    delta = mp.sensitivities(ev, len(units))

    def nll(m):
        logp = jax.nn.log_softmax(np.asarray(m(jnp.asarray(CAL)), np.float64)[:, :-1], -1)
        return -np.mean(np.take_along_axis(np.asarray(logp), CAL[:, 1:, None], -1))

    rules = [r.to_rule() for r in mp.allocation_rules(units[2:3], np.array([0]), options)]
    real = nll(qjax.quantize(model, qjax.Recipe(tuple(rules)), "ptq")) - nll(model)
    assert delta[2, 0] == pytest.approx(real, rel=1e-3, abs=1e-6)
    assert np.all(np.abs(delta[:, 0]) > np.abs(delta[:, -1]))  # int2 moves the loss more than int8 (a random model: either way)


def test_a_too_small_budget_is_an_error_naming_the_numbers(model):
    units, costs, *_ = mp.plan(model, config(avg_bits=8.0))
    minimum = sum(real_nbytes(get_module(model, p).kernel.get_value(), SpecConfig(**OPTIONS[0]).to_spec("weight"))
                  for u in units for p in u.paths)  # fmt: skip
    budget = int(1.5 * sum(get_module(model, p).kernel.get_value().size for u in units for p in u.paths) / 8)
    step = Step.from_config({"mixed_precision": {"options": OPTIONS, "avg_bits": 1.5}}, "steps.0", "test.yaml")
    with pytest.raises(ValueError, match=rf"avg_bits=1\.5 \({budget} bytes.*below the all-lowest.*int2/g32/asym.*{minimum} bytes"):
        step.check(model)


def test_bad_configs_are_clear_errors():
    for bad, match in ((dict(avg_bits=4.0, budget_mb=1.0), "exactly one"), (dict(), "exactly one"), (dict(avg_bits=0.0), "positive"),
                       (dict(avg_bits=4.0, unit="block"), "unit"), (dict(avg_bits=4.0, score="random"), "score"),
                       (dict(avg_bits=4.0, allocator="ilp"), "allocator"), (dict(avg_bits=4.0, evo_survivors=9), "evo_survivors"),
                       (dict(avg_bits=4.0, calibration_windows=0), "calibration_windows"), (dict(avg_bits=4.0, options=[]), "at least one"),
                       (dict(avg_bits=4.0, options=[OPTIONS[0], OPTIONS[0]]), "repeat")):  # fmt: skip
        with pytest.raises(ValueError, match=f"mixed_precision.*{match}"):
            config(**bad)
    with pytest.raises(ConfigError, match=r"test\.yaml.*steps\.0\.mixed_precision.*score"):
        Step.from_config({"mixed_precision": {"options": OPTIONS, "avg_bits": 4, "score": "nope"}}, "steps.0", "test.yaml")
    with pytest.raises(ValueError, match="mixed_precision needs a model with a structure map"):
        mp.check(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), config(avg_bits=4.0))


def test_packed_weights_are_refused(model):
    packed = qjax.quantize(model, qjax.Recipe((qjax.Rule(r"layers\.1\.mlp\.up_proj", weight=qjax.QuantSpec("int4")),)), "ptq")
    with pytest.raises(ValueError, match=r"mixed_precision: layers\.1\.mlp\.up_proj already holds a packed weight"):
        mp.check(packed, config(avg_bits=4.0))


# ---- the step ---------------------------------------------------------------------------------------------------


def run_step(model, tmp_path, **body):
    steps = [Step.from_config({"mixed_precision": {"options": OPTIONS, **body}}, "steps.0", "test.yaml")]
    steps[0].check(model)
    cache = PrefixCache(str(tmp_path / "cache"))
    ctx = Context(key=jax.random.key(0), calibration=CAL, batch_size=4, progress=False)
    out, _ = run_steps(model, steps, ctx, cache=cache, keys=prefix_keys({}, steps))
    return out, ctx.metrics, cache.path(prefix_keys({}, steps)[0]) + ".work"


@pytest.mark.parametrize("body", [
    dict(score="lim", allocator="greedy", avg_bits=4.6),
    dict(score="zd", allocator="knapsack", avg_bits=4.5, unit="linear"),
    dict(score="sensitivity", allocator="knapsack", budget_mb=0.08),
    dict(score="uniform", allocator="greedy", avg_bits=4.0),
    dict(score="reverse_lim", allocator="knapsack", avg_bits=5.0),
])  # fmt: skip
def test_step_respects_the_budget_and_writes_reusable_rules(model, tmp_path, body):
    out, metrics, workdir = run_step(model, tmp_path, **body)
    params = sum(get_module(model, f"layers.{i}.{r}").kernel.get_value().size for i in range(4) for r in family_of(model).linears)
    budget = int(body["avg_bits"] * params / 8) if "avg_bits" in body else int(body["budget_mb"] * 1e6)
    used = linear_bytes(out)
    assert len(quantized_ops(out)) == 28 and used == metrics["mixed_precision_bytes"] <= budget == metrics["mixed_precision_budget_bytes"]
    assert metrics["mixed_precision_avg_bits"] == pytest.approx(8 * used / params)
    if body["score"] != "sensitivity":  # values grow with the width: no unit can go up one level within the budget
        units, costs, options, *_ = mp.plan(model, config(**{k: v for k, v in body.items() if k != "score"}))
        levels = levels_of(metrics["mixed_precision_rules"], units, options)
        assert mp.total_cost(costs, levels) == used
        assert all(used + costs[u, lv + 1] - costs[u, lv] > budget for u, lv in enumerate(levels) if lv < len(options) - 1)
    # the YAML is a quantize step giving the same model; the metrics hold the same rules
    with open(os.path.join(workdir, "mixed_precision.yaml")) as f:
        entry = yaml.safe_load(f)
    assert entry["quantize"]["rules"] == metrics["mixed_precision_rules"]
    assert entry["quantize"]["rules"][0]["pattern"] == r"layers\.0\.self_attn\.q_proj"
    reuse = [Step.from_config(entry, "steps.0", "mixed_precision.yaml")]
    again, _ = run_steps(model, reuse, Context(key=jax.random.key(0), progress=False))
    assert linear_bytes(again) == used
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(CAL))), np.asarray(out(jnp.asarray(CAL))))
    assert not np.allclose(np.asarray(out(jnp.asarray(CAL))), np.asarray(model(jnp.asarray(CAL))))


def test_lim_order_gives_the_low_width_to_the_least_important_layer(model, tmp_path):
    lim = mp.lim_scores(model, BATCHES)
    out, metrics, _ = run_step(model, tmp_path, score="lim", avg_bits=4.6)
    widths = {}
    for r in metrics["mixed_precision_rules"]:
        widths.setdefault(int(r["pattern"].split("\\.")[1]), set()).add(r["weight"]["format"])
    assert all(len(w) == 1 for w in widths.values())  # a layer unit shares one spec
    bits = [int(widths[i].pop()[3:]) for i in range(4)]
    assert bits[int(np.argmin(lim))] <= bits[int(np.argmax(lim))] and len(set(bits)) > 1, (lim, bits)


def test_evo_fitness_never_increases_and_matches_the_real_model(model, tmp_path):
    units, costs, options, params, budget = mp.plan(model, config(avg_bits=4.5))
    specs = [o.to_spec("weight") for o in options]
    ev = mp.FakeQuantModel(model, units, specs, CAL, 4)
    calls = []

    def fitness(levels, windows):
        calls.append((mp.total_cost(costs, levels), len(windows)))
        return ev.kl(levels, windows)

    start = mp.greedy(costs, np.zeros(len(units)), budget)
    best, history = mp.evo_search(start, costs, budget, fitness, len(CAL), jax.random.key(1), 6, 4, 2, 2)
    assert len(history) == 7 and all(b <= a for a, b in zip(history, history[1:], strict=False)), history
    assert history[-1] < history[0]  # the search found something better than the round-robin start
    assert max(c for c, _ in calls) <= budget and {n for _, n in calls} == {2, len(CAL)}  # screened on 2 windows, picked on all
    # the fitness is the KL of the really quantized model
    real = qjax.quantize(model, qjax.Recipe(tuple(r.to_rule() for r in mp.allocation_rules(units, best, options))), "ptq")
    p = jax.nn.log_softmax(np.asarray(model(jnp.asarray(CAL)), np.float64), -1)
    q = jax.nn.log_softmax(np.asarray(real(jnp.asarray(CAL)), np.float64), -1)
    assert history[-1] == pytest.approx(float(np.mean(np.sum(np.exp(p) * (p - q), -1))), rel=1e-3)


def test_evo_step_through_the_pipeline(model, tmp_path):
    out, metrics, _ = run_step(model, tmp_path, score="uniform", allocator="evo", avg_bits=4.5, evo_generations=3, evo_offspring=3)
    assert metrics["mixed_precision_evo_kl_last"] <= metrics["mixed_precision_evo_kl_first"]
    assert metrics["mixed_precision_evo_generations"] == 3
    assert linear_bytes(out) <= metrics["mixed_precision_budget_bytes"]


def test_biases_count_in_the_budget(tmp_path):
    from tests.hf_tiny import load_tiny

    qwen = load_tiny(tmp_path, "qwen2", outliers=False)  # q/k/v projections have biases
    out, metrics, _ = run_step(qwen, tmp_path, score="zd", allocator="knapsack", avg_bits=4.0)
    assert linear_bytes(out) == metrics["mixed_precision_bytes"] <= metrics["mixed_precision_budget_bytes"]
    assert any(op.bias is not None for op in quantized_ops(out).values())

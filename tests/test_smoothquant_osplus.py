"""SmoothQuant and OS+ steps: exact in float, scales equal a float64 reference, W/A quantization error falls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tests.hf_tiny import ids, load_tiny, rel_err
from tests.np_reference import int_symmetric, per_token_int

import qjax
from qjax import QuantSpec, Rule, per_axis, per_token
from qjax.experiments import stats
from qjax.experiments.os_plus import OSPlusConfig, os_plus
from qjax.experiments.pipeline import Context, Step, run_steps
from qjax.experiments.schema import ConfigError
from qjax.experiments.smoothquant import ALPHA_GRID, SmoothQuantConfig, smoothquant
from qjax.models.structure import family_of, get_module

CAL = np.random.default_rng(1).integers(0, 97, (8, 16))  # calibration windows, distinct from the evaluation ids()
BATCHES = [CAL[:4], CAL[4:]]


def quant_err(model, ref, weight_bits=8, act_bits=8) -> float:
    """Relative logit error of the model with its decoder linears at W{weight_bits}A{act_bits} (heads/embeddings float)."""
    rule = Rule(pattern=r"layers\..*|h\..*", op="dot_general", weight=QuantSpec(f"int{weight_bits}", per_axis(1)),
                act=QuantSpec(f"int{act_bits}", per_token()))  # fmt: skip
    return rel_err(qjax.quantize(model, qjax.Recipe((rule,)))(ids()), ref)


def first_norm_gain(model) -> np.ndarray:
    """The gain of layer 0's attention input norm (the producer of the first group)."""
    layer = family_of(model).layers(model)[0]
    return np.asarray(get_module(layer, family_of(model).groups(model)[0].producer).scale.get_value())


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_both_steps_preserve_the_float_model(tmp_path, family):
    model = load_tiny(tmp_path, family)
    ref = model(ids())
    sq, _ = smoothquant(nnx.clone(model), SmoothQuantConfig(alpha=0.5, groups="all"), BATCHES)
    osp, report = os_plus(nnx.clone(model), OSPlusConfig(groups="all"), BATCHES)
    for m in (sq, osp):
        assert rel_err(m(ids()), ref) < 1e-4
        assert not np.allclose(first_norm_gain(m), first_norm_gain(model))  # something was folded
    # LayerNorm families shift every group (all have biases); RMSNorm families never shift
    assert all(r["shift"] == (family in ("opt", "gpt2")) for r in report)
    assert len(report) == 2 * len(family_of(model).groups(model))


def test_smoothquant_scale_matches_float64_formula(tmp_path):
    model = load_tiny(tmp_path, "llama")  # GQA: 4 heads, 2 KV heads, head_dim 16
    alpha = 0.6
    orig = nnx.clone(model)
    got = stats.collect(orig, BATCHES, r"layers\.\d+\.self_attn\.(q_proj|o_proj)", stats.absmax())
    smoothed, _ = smoothquant(model, SmoothQuantConfig(alpha=alpha, groups="all"), BATCHES)
    for i in range(2):
        a, b = orig.layers[i], smoothed.layers[i]
        # norm → q, k, v: s = max|X|^α / max|W|^(1−α) over the rows of all three kernels
        w = np.concatenate([np.asarray(get_module(a, f"self_attn.{p}_proj").kernel.get_value(), np.float64) for p in "qkv"], 1)
        x = np.asarray(got[f"layers.{i}.self_attn.q_proj"], np.float64)
        s = np.maximum(x**alpha / np.maximum(np.abs(w).max(1), 1e-5) ** (1 - alpha), 1e-5)
        applied = np.asarray(a.input_layernorm.scale.get_value(), np.float64) / np.asarray(b.input_layernorm.scale.get_value(), np.float64)
        np.testing.assert_allclose(applied, s, rtol=1e-4)
        # v → o under GQA: per V channel, max over the heads that read it, of |X| and of |W_o| rows
        xo = np.asarray(got[f"layers.{i}.self_attn.o_proj"], np.float64).reshape(2, 2, 16)  # (kv head, repeat, dim)
        wo = np.abs(np.asarray(a.self_attn.o_proj.kernel.get_value(), np.float64)).max(1).reshape(2, 2, 16)
        s_v = np.maximum(xo.max(1) ** alpha / np.maximum(wo.max(1), 1e-5) ** (1 - alpha), 1e-5).reshape(32)
        rows = np.asarray(b.self_attn.o_proj.kernel.get_value(), np.float64) / np.asarray(a.self_attn.o_proj.kernel.get_value(), np.float64)
        np.testing.assert_allclose(rows, np.broadcast_to(np.r_[s_v[:16], s_v[:16], s_v[16:], s_v[16:]][:, None], rows.shape), rtol=1e-4)


def test_smoothquant_lowers_w8a8_error_on_outlier_model(tmp_path):
    model = load_tiny(tmp_path, "llama", outliers=True)
    ref = model(ids())
    smoothed, _ = smoothquant(nnx.clone(model), SmoothQuantConfig(alpha=0.5), BATCHES)
    before, after = quant_err(model, ref), quant_err(smoothed, ref)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_os_plus_lowers_low_bit_error_on_opt(tmp_path, weight_bits):
    model = load_tiny(tmp_path, "opt", outliers=True)
    ref = model(ids())
    cfg = OSPlusConfig(act_bits=4, weight_bits=weight_bits)
    transformed, report = os_plus(nnx.clone(model), cfg, BATCHES)
    before, after = quant_err(model, ref, weight_bits, 4), quant_err(transformed, ref, weight_bits, 4)
    assert after < 0.85 * before, (before, after)
    assert all(r["shift"] for r in report) and any(r["ratio"] < 1 for r in report)


def _np_group_loss(x, w, s):
    """Σ ‖Q_a(X/s)·Q_w(s·W) − X·W‖² with per-token int8 activations and per-channel int8 weights, in float64."""
    y = per_token_int(x / s, 8) @ int_symmetric(w * s[:, None], 8, axis_keep=(1,))
    return float(np.sum((y - x @ w) ** 2))


def test_alpha_search_picks_the_grid_value_with_lowest_error(tmp_path):
    model = load_tiny(tmp_path, "llama")
    layer = model.layers[0]
    fam = family_of(model)
    x = np.concatenate([np.asarray(layer.input_layernorm(fam.embed(model, jnp.asarray(b))[0]), np.float64).reshape(-1, 64)
                        for b in BATCHES])  # fmt: skip
    w = np.concatenate([np.asarray(get_module(layer, f"self_attn.{p}_proj").kernel.get_value(), np.float64) for p in "qkv"], 1)
    amax, wmax = np.abs(x).max(0), np.maximum(np.abs(w).max(1), 1e-5)
    ref = {a: _np_group_loss(x, w, np.maximum(amax**a / wmax ** (1 - a), 1e-5)) for a in ALPHA_GRID}
    _, report = smoothquant(nnx.clone(model), SmoothQuantConfig(alpha=None), BATCHES)
    first = next(r for r in report if r["layer"] == 0 and r["producer"] == "input_layernorm")
    assert first["alpha"] in ALPHA_GRID
    np.testing.assert_allclose(first["losses"], [ref[a] for a in ALPHA_GRID], rtol=1e-2)
    assert ref[first["alpha"]] <= ref[0.5] * (1 + 1e-3)
    assert ref[first["alpha"]] <= min(ref.values()) * (1 + 1e-2)
    assert len({r["alpha"] for r in report}) > 1 or first["alpha"] != 0.5  # the search is not the default in disguise


def test_bad_configs_and_unsupported_cases_are_clear_errors(tmp_path):
    for bad in (dict(alpha=1.5), dict(alpha=-0.1), dict(alpha=None, alpha_grid=[0.5, 1.2]), dict(groups="some"), dict(act_bits=9)):
        with pytest.raises(ValueError, match="smoothquant"):
            SmoothQuantConfig(**bad)
    for bad in (dict(shift="maybe"), dict(ratio_grid=[0.0, 0.5]), dict(weight_bits=1)):
        with pytest.raises(ValueError, match="os_plus"):
            OSPlusConfig(**bad)
    with pytest.raises(ConfigError, match=r"test\.yaml.*steps\.0\.smoothquant.*alpha"):
        Step.from_config({"smoothquant": {"alpha": 2.0}}, "steps.0", "test.yaml")
    model = load_tiny(tmp_path, "llama")
    with pytest.raises(ValueError, match="os_plus.*llama.*input_layernorm"):
        Step.from_config({"os_plus": {"shift": "on"}}, "steps.0", "test.yaml").check(model)
    with pytest.raises(ValueError, match="smoothquant needs a model with a structure map"):
        Step.from_config("smoothquant", "steps.0", "test.yaml").check(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    emb = model.embed_tokens.embedding
    emb.set_value(emb.get_value().at[int(CAL[0, 0])].set(jnp.nan))
    with pytest.raises(ValueError, match=r"the input of .* contains \d+ NaN/Inf"):
        smoothquant(model, SmoothQuantConfig(), BATCHES)


def test_steps_run_through_the_pipeline(tmp_path):
    model = load_tiny(tmp_path, "opt")
    ref = model(ids())
    gain = np.asarray(model.layers[0].final_layer_norm.scale.get_value())
    steps = [Step.from_config({"smoothquant": {"alpha": 0.5}}, "steps.0", "test.yaml"),
             Step.from_config({"os_plus": {"shift": "on", "groups": "norms"}}, "steps.1", "test.yaml")]  # fmt: skip
    for s in steps:
        s.check(model)
    ctx = Context(key=jax.random.key(0), calibration=CAL, batch_size=2, progress=False)
    out, timings = run_steps(model, steps, ctx)
    assert rel_err(out(ids()), ref) < 1e-4
    assert not np.allclose(np.asarray(out.layers[0].final_layer_norm.scale.get_value()), gain)
    np.testing.assert_array_equal(np.asarray(model.layers[0].final_layer_norm.scale.get_value()), gain)  # input untouched
    assert set(timings) == {"time_0_smoothquant", "time_1_os_plus"} and 0 < ctx.metrics["os_plus_ratio_mean"] <= 1

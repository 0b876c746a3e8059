"""The `awq` step: exact scale folding, scale and clip searches equal to float64 numpy references, lower
error than RTN (alone and before GPTQ), packed weights kept by a later `quantize`, clear config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tests.hf_tiny import ids, load_tiny, rel_err

import qjax
from qjax.experiments import stats
from qjax.experiments.awq import AWQConfig, awq, awq_step, check, clip_search
from qjax.experiments.basic_steps import QuantizeConfig
from qjax.experiments.config import RuleConfig, SpecConfig
from qjax.experiments.pipeline import Context, Step, run_steps
from qjax.experiments.schema import ConfigError
from qjax.models.structure import family_of, get_module
from qjax.numerics import QArray, get_format, quantize
from qjax.transforms import quantized_ops

CAL = np.random.default_rng(5).integers(0, 97, (32, 32))  # 1024 calibration tokens, distinct from ids()
BATCHES = [CAL[i : i + 8] for i in range(0, 32, 8)]
W3G16 = {"format": "int3", "granularity": "group", "group_size": 16, "symmetric": False}
W4G16 = {"format": "int4", "granularity": "group", "group_size": 16, "symmetric": False}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_tiny(tmp_path_factory.mktemp("awq"), "llama", outliers=True)  # GQA: 4 heads, 2 KV heads, head_dim 16


def _ctx() -> Context:
    return Context(key=jax.random.key(0), calibration=CAL, batch_size=8, progress=False)


def _awq(model, weight: dict, **kw):
    return awq(nnx.clone(model), AWQConfig(weight=SpecConfig(**weight), **kw), BATCHES)


def _rtn(model, weight: dict):
    return qjax.quantize(model, QuantizeConfig(rules=[RuleConfig(pattern=r"layers\..*", weight=SpecConfig(**weight))]).recipe(), "ptq")


def _inputs(model, path: str) -> np.ndarray:
    """Every calibration token's input to `path` (float64 rows), through an observer that keeps them all."""
    n = CAL.size

    def update(s, x):
        rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        return {"x": jax.lax.dynamic_update_slice(s["x"], rows, (s["i"], 0)), "i": s["i"] + rows.shape[0]}

    obs = stats.Observer(lambda f: {"x": jnp.zeros((n, f), jnp.float32), "i": jnp.zeros((), jnp.int32)}, update)
    got = stats.collect(model, BATCHES, path.replace(".", r"\."), obs)[path]
    assert int(got["i"]) == n
    return np.asarray(got["x"], np.float64)


def np_quant(w, bits: int, group: int, lo=None, hi=None, symmetric: bool = False) -> np.ndarray:
    """Int fake quantization of w (C, O) in groups of `group` input rows per output column, from the tile range
    [lo, hi] (default min/max): asymmetric (zero point) or symmetric (abs-max); scale and w/scale in float32."""
    fmt = get_format(f"int{bits}")
    c, o = w.shape
    wt = np.asarray(w, np.float64).reshape(c // group, group, o)
    lo = wt.min(1, keepdims=True) if lo is None else lo
    hi = wt.max(1, keepdims=True) if hi is None else hi
    lo, hi = np.minimum(lo, 0.0).astype(np.float32), np.maximum(hi, 0.0).astype(np.float32)
    if symmetric:
        scale, zp = (np.maximum(-lo, hi) / np.float32(fmt.qmax)).astype(np.float32), np.float32(0)
    else:
        scale = np.where(hi > lo, (hi - lo) / np.float32(fmt.qmax - fmt.qmin), np.float32(1)).astype(np.float32)
        zp = np.clip(np.round(fmt.qmin - lo / scale), fmt.qmin, fmt.qmax).astype(np.float32)
    q = np.clip(np.round((wt.astype(np.float32) / scale + zp).astype(np.float32)), fmt.qmin, fmt.qmax)
    return ((q - zp).astype(np.float64) * scale.astype(np.float64)).reshape(c, o)


def tile_errors(x, err, group: int) -> np.ndarray:
    """Per (input group, output channel): Σ_t (x_t,g · err_g,o)² (float64)."""
    c = x.shape[1]
    return np.stack([((x[:, k : k + group] @ err[k : k + group]) ** 2).sum(0) for k in range(0, c, group)])


# ---- exactness in float --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_scales_only_keep_the_float_model(tmp_path, family):
    model = load_tiny(tmp_path, family)
    ref = model(ids())
    scaled, report = _awq(model, W4G16, clip=False)
    assert rel_err(scaled(ids()), ref) < 1e-4
    assert not quantized_ops(scaled)  # float kernels: scales folded only (GPTQ can follow)
    fam = family_of(model)
    assert len(report["scales"]) == 2 * len(fam.groups(model)) and not report["clip"]
    assert any(r["ratio"] > 0 for r in report["scales"])  # something was folded
    g0 = fam.groups(model)[0].producer
    before, after = (np.asarray(get_module(fam.layers(m)[0], g0).scale.get_value()) for m in (model, scaled))
    assert not np.allclose(before, after)


# ---- the scale search against numpy --------------------------------------------------------------------------


@pytest.mark.parametrize("producer, consumers", [("self_attn.v_proj", ["self_attn.o_proj"]), ("mlp.up_proj", ["mlp.down_proj"]),
                                                 ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"])])  # fmt: skip
def test_chosen_ratio_minimises_numpy_loss(llama, producer, consumers):
    """Layer 0: s(r) = mean|x|^r normalised (under GQA, V channel j averages the o_proj inputs of both heads reading it);
    the applied s is the candidate whose Σ‖(x/s)·Q(s·W) − x·W‖² (numpy, float64) is smallest."""
    x = _inputs(llama, f"layers.0.{consumers[0]}")
    kernels = [np.asarray(get_module(llama.layers[0], c).kernel.get_value(), np.float64) for c in consumers]
    m = np.abs(x).mean(0)
    if producer == "self_attn.v_proj":  # o_proj input (head h, dim d) reads V channel (h // 2, d)
        m_kv = m.reshape(2, 2, 16).mean(1)
        m = np.repeat(m_kv, 2, axis=0).reshape(64)
    ratios = [i / 20 for i in range(20)]
    cands = [np.maximum(m, 1e-4) ** r for r in ratios]
    cands = [s / np.sqrt(s.max() * s.min()) for s in cands]
    losses = np.array([sum(np.sum((x @ (np_quant(w * s[:, None], 4, 16) / s[:, None] - w)) ** 2) for w in kernels) for s in cands])
    scaled, report = _awq(llama, W4G16, clip=False)
    (got,) = [r for r in report["scales"] if r["layer"] == 0 and r["producer"] == producer]
    k = ratios.index(got["ratio"])
    applied = np.asarray(get_module(scaled.layers[0], consumers[0]).kernel.get_value(), np.float64) / kernels[0]
    np.testing.assert_allclose(applied, np.broadcast_to(cands[k][:, None], applied.shape), rtol=1e-4)
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-3)  # the step's float32 Gram-form losses
    assert losses[k] <= losses.min() * (1 + 1e-6), (k, int(np.argmin(losses)), losses)
    assert losses[k] < 0.99 * losses[0]  # better than no scaling (r = 0): the choice matters


# ---- the clip search against numpy ---------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False], ids=["int4_sym", "int3_asym"])
def test_clip_search_picks_the_best_ratio_per_tile(symmetric):
    """Per (group, output channel) the chosen clip has the smallest output error of all ratios (numpy float64,
    exhaustive), never above RTN's, and the packed weight reproduces it. Asymmetric: when both ends are clipped
    the zero point qmin + (qmax − qmin)/2 sits on a rounding tie that float32 noise decides (llm-awq's too), so
    there the exhaustive match is checked on most tiles, and the installed weight against RTN on all."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 64)) * np.where(np.arange(64) % 16 == 3, 20.0, 1.0)
    w = rng.standard_t(3, (64, 48)) * 0.05
    ratios = 1.0 - np.arange(11) / 20
    bits, weight = (4, {**W4G16, "symmetric": True}) if symmetric else (3, W3G16)
    spec = SpecConfig(**weight).to_spec("weight")
    scale, zp, chosen, err, err_first = clip_search(jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x, jnp.float32),
                                                    jnp.asarray(ratios, jnp.float32), spec)  # fmt: skip
    err, err_first = np.asarray(err, np.float64), np.asarray(err_first, np.float64)
    wt = w.reshape(4, 16, 48)
    lo, hi = wt.min(1, keepdims=True), wt.max(1, keepdims=True)
    amax = np.maximum(-lo, hi).astype(np.float32)
    t = [amax * np.float32(r) for r in ratios]  # in float32, as the step
    per_ratio = np.stack([tile_errors(x, np_quant(w, bits, 16, np.maximum(lo, -tr), np.minimum(hi, tr), symmetric) - w, 16) for tr in t])
    best = per_ratio.min(0)
    np.testing.assert_allclose(err_first, per_ratio[0], rtol=2e-3)
    match = np.isclose(err, best, rtol=2e-3)
    assert match.all() if symmetric else match.mean() > 0.8, np.argwhere(~match)
    assert np.all(err <= err_first)
    assert np.mean(np.asarray(chosen) < 1.0) > 0.3  # clipping is chosen for many tiles (the test can tell)
    # the installed codes: their numpy error per tile is the one the search reports, at most RTN's
    deq = np.asarray(quantize(jnp.asarray(w, jnp.float32), spec, scale=scale, zero_point=zp).dequantize(), np.float64)
    mine, rtn = tile_errors(x, deq - w, 16), tile_errors(x, np_quant(w, bits, 16, symmetric=symmetric) - w, 16)
    np.testing.assert_allclose(mine, err, rtol=2e-3)
    assert np.all(mine <= rtn * (1 + 1e-4)) and mine.sum() < 0.9 * rtn.sum()


def test_installed_clip_beats_rtn_per_group_on_the_layer_inputs(llama):
    """Layer 0 down_proj: the packed AWQ weight vs RTN of the same (scaled) kernel, on down_proj's inputs."""
    scaled, _ = _awq(llama, W3G16, clip=False)  # layer 0 has the same scales with clip (same inputs)
    clipped, report = _awq(llama, W3G16)
    path = "layers.0.mlp.down_proj"
    x = _inputs(scaled, path)
    w = np.asarray(get_module(scaled, path).kernel.get_value(), np.float64)
    packed = get_module(clipped, path).kernel.get_value()
    assert isinstance(packed, QArray)
    mine = tile_errors(x, np.asarray(packed.dequantize(), np.float64) - w, 16)
    rtn = tile_errors(x, np_quant(w, 3, 16) - w, 16)
    assert np.all(mine <= rtn * (1 + 1e-4) + 1e-9 * rtn.max()), np.max(mine / rtn)
    assert mine.sum() < 0.95 * rtn.sum()
    (rec,) = [r for r in report["clip"] if r["path"] == path]
    assert rec["clip_ratio"] < 1.0 and rec["error"] < rec["error_rtn"]
    np.testing.assert_allclose(rec["error"], mine.sum(), rtol=2e-3)
    # q/k are rounded without clip search (llm-awq skips them: their outputs meet in q·kᵀ)
    assert all(r["clip_ratio"] == 1.0 for r in report["clip"] if r["path"].endswith(("q_proj", "k_proj")))


# ---- end to end ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("weight", [W3G16, W4G16], ids=["w3g16", "w4g16"])
def test_awq_beats_rtn_on_logits(tmp_path, family, weight):
    model = load_tiny(tmp_path, family)
    ref = model(ids())
    ctx = _ctx()
    q = awq_step(nnx.clone(model), AWQConfig(weight=SpecConfig(**weight)), ctx)
    rtn = _rtn(model, weight)
    ops = quantized_ops(q)
    assert len(ops) == 14 and all(isinstance(op.kernel.get_value(), QArray) for op in ops.values())
    assert ctx.metrics["awq_linears"] == 14 and 0.5 <= ctx.metrics["awq_clip_ratio_mean"] < 1.0
    assert qjax.param_bytes(q) == qjax.param_bytes(rtn)  # same packed layout, scales and zero points
    a, r = rel_err(q(ids()), ref), rel_err(rtn(ids()), ref)
    assert a < 0.9 * r, (a, r)


def test_awq_scales_then_gptq_through_run_steps(llama):
    """[awq (clip: false), gptq]: the reference's AWQ+GPTQ (scales only, GPTQ quantizes) beats RTN; after clip: true
    the weights are packed and gptq refuses them."""
    steps = [Step.from_config({"awq": {"weight": W3G16, "clip": False}}, "steps.0", "test"),
             Step.from_config({"gptq": {"weight": W3G16}}, "steps.1", "test")]  # fmt: skip
    for s in steps:
        s.check(llama)
    final, timings = run_steps(llama, steps, _ctx())
    assert set(timings) == {"time_0_awq", "time_1_gptq"}
    ref = llama(ids())
    assert rel_err(final(ids()), ref) < 0.8 * rel_err(_rtn(llama, W3G16)(ids()), ref)
    clipped = run_steps(llama, [Step.from_config({"awq": {"weight": W3G16}}, "steps.0", "test")], _ctx())[0]
    with pytest.raises(ValueError, match="already holds a packed weight"):
        steps[1].check(clipped)


def test_following_quantize_keeps_awq_weights(llama):
    steps = [Step.from_config({"awq": {"weight": W4G16}}, "steps.0", "test"),
             Step.from_config({"quantize": {"rules": [{"pattern": "lm_head", "skip": True},
                                                      {"weight": W4G16, "act": {"format": "int8", "granularity": "token"}}]}},
                              "steps.1", "test")]  # fmt: skip
    alone = run_steps(llama, steps[:1], _ctx())[0]
    final = run_steps(llama, steps, _ctx())[0]
    before, after = quantized_ops(alone), quantized_ops(final)
    assert sorted(before) == sorted(after) and len(after) == 14
    for path, op in after.items():
        assert op.rule.act is not None and op.mode == "ptq"
        a, b = op.kernel.get_value(), before[path].kernel.get_value()
        for f in ("values", "scale", "zero_point"):
            np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))
    ref = llama(ids())
    assert rel_err(final(ids()), ref) < 1.1 * rel_err(alone(ids()), ref)  # int8 activations add little


def test_bad_configs_and_models_are_refused(llama):
    def step(body):
        return Step.from_config({"awq": body}, "steps.0", "test.yaml")

    for body, msg in [({"weight": W4G16, "ratio_grid": 0}, "ratio_grid"), ({"weight": W4G16, "clip_min": 0.0}, "clip_min"),
                      ({"weight": W4G16, "clip_min": 1.5}, "clip_min"), ({"weight": W4G16, "groups": "some"}, "groups"),
                      ({"weight": W4G16, "pattern": "("}, "not a valid regex"), ({"weight": W4G16, "clip_skip": "[q"}, "clip_skip"),
                      ({"weight": {**W4G16, "rounding": "stochastic"}}, "rounds to nearest"), ({}, "weight"),
                      ({"weight": W4G16, "alpha": 0.5}, "alpha")]:  # fmt: skip
        with pytest.raises(ConfigError, match=msg):
            step(body)
    with pytest.raises(ValueError, match="awq: pattern 'lm_head' matches no linear"):
        step({"weight": W4G16, "pattern": "lm_head"}).check(llama)
    with pytest.raises(ValueError, match=r"awq: layers.0.self_attn.q_proj already holds a packed weight"):
        check(_rtn(llama, W4G16), AWQConfig(weight=SpecConfig(**W4G16)))
    rotated = run_steps(llama, [Step.from_config({"rotate": {"online_o_proj": True}}, "steps.0", "test")], _ctx())[0]
    with pytest.raises(ValueError, match=r"awq: layers.0.self_attn.o_proj has an online input transform"):
        check(rotated, AWQConfig(weight=SpecConfig(**W4G16)))
    check(rotated, AWQConfig(weight=SpecConfig(**W4G16), pattern=r".*(q|k|gate)_proj"))  # groups away from the transforms
    assert AWQConfig(weight=SpecConfig(**W4G16)).clip_ratios().tolist() == pytest.approx([1 - i / 20 for i in range(11)])

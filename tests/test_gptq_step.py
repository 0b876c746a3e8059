"""The `gptq` pipeline step on a tiny Hugging Face Llama: it beats RTN, feeds GPTQ the right data, and its
packed weights survive a later `quantize` step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tests.hf_tiny import ids, load_tiny, rel_err

import qjax
from qjax.experiments import gptq_step, stats
from qjax.experiments.basic_steps import QuantizeConfig
from qjax.experiments.config import RuleConfig, SpecConfig
from qjax.experiments.gptq import gptq_quantize
from qjax.experiments.pipeline import Context, Step, run_steps
from qjax.models.structure import family_of
from qjax.numerics.linear_maps import Rotation
from qjax.transforms import float_op, quantized_ops
from qjax.transforms.nnx_modules import set_child

CAL = np.random.default_rng(5).integers(0, 97, (32, 32))  # 1024 calibration tokens
INT3_G16 = {"format": "int3", "granularity": "group", "group_size": 16}
INT4_CHANNEL = {"format": "int4", "granularity": "channel"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_tiny(tmp_path_factory.mktemp("gptq"), "llama", outliers=False)


def _ctx() -> Context:
    return Context(key=jax.random.key(0), calibration=CAL, batch_size=8, progress=False)


def _gptq(model, weight: dict, ctx: Context | None = None, **kw):
    return gptq_step.gptq_step(nnx.clone(model), gptq_step.GPTQConfig(weight=SpecConfig(**weight), **kw), ctx or _ctx())


def _rtn(model, weight: dict):
    cfg = QuantizeConfig(rules=[RuleConfig(pattern=r"layers\..*", weight=SpecConfig(**weight))])
    return qjax.quantize(model, cfg.recipe(), "ptq")


def _layer_errors(model, quantized) -> list[float]:
    """Each layer's output error on the float model's inputs to that layer (held-out tokens)."""
    fam = family_of(model)
    x, aux = fam.embed(model, ids())
    errs = []
    for f, q in zip(fam.layers(model), fam.layers(quantized)):
        y = fam.call_layer(f, x, aux)
        errs.append(rel_err(fam.call_layer(q, x, aux) - x, y - x))  # the layer's contribution to the residual
        x = y
    return errs


@pytest.mark.parametrize("weight", [INT3_G16, INT4_CHANNEL], ids=["int3_g16", "int4_channel"])
def test_gptq_beats_rtn_per_layer_and_on_logits(model, weight):
    ctx = _ctx()
    gptq, rtn = _gptq(model, weight, ctx), _rtn(model, weight)
    assert ctx.metrics["gptq_linears"] == 14 and ctx.metrics["gptq_retries"] == 0 and ctx.metrics["gptq_error"] > 0
    g_layers, r_layers = _layer_errors(model, gptq), _layer_errors(model, rtn)
    assert all(g < r for g, r in zip(g_layers, r_layers)), (g_layers, r_layers)
    ref = model(ids())
    g_logits, r_logits = rel_err(gptq(ids()), ref), rel_err(rtn(ids()), ref)
    assert g_logits < 0.9 * r_logits, (g_logits, r_logits)
    assert qjax.param_bytes(gptq) == qjax.param_bytes(rtn)  # same packed layout, scales and zero points


@pytest.mark.parametrize("transform", [False, True], ids=["plain", "online_rotation"])
def test_first_linear_gets_gptq_on_its_own_inputs(model, transform):
    """q_proj of layer 0 equals gptq_quantize on H = 2/N XᵀX from numpy, X = the norm of the embedded tokens
    (times the online rotation Q when q_proj has one: the Hessian of what the op multiplies)."""
    model = nnx.clone(model)
    layer = model.layers[0]
    q = np.linalg.qr(np.random.default_rng(2).standard_normal((64, 64)))[0]
    if transform:
        op = float_op(layer.self_attn.q_proj, "layers.0.self_attn.q_proj")
        set_child(layer.self_attn, ("q_proj",), op)
        op.add_input_transform(Rotation(jnp.asarray(q[None], jnp.float32)))
    kernel = np.asarray(layer.self_attn.q_proj.kernel.get_value())
    x = np.concatenate([np.asarray(layer.input_layernorm(model.embed_tokens(jnp.asarray(b))), np.float64).reshape(-1, 64)
                        for b in CAL])  # fmt: skip
    if transform:
        x = x @ q
    h = 2.0 / len(x) * x.T @ x
    spec = SpecConfig(**INT3_G16).to_spec("weight")
    want, _ = gptq_quantize(kernel, h, spec, block_size=128)
    got = quantized_ops(_gptq(model, INT3_G16))["layers.0.self_attn.q_proj"]
    assert got.input_transform is not None if transform else got.input_transform is None
    got = got.kernel.get_value()
    # H here is float64 from numpy, the step's float32-accumulated: a rare code may flip at a rounding boundary
    assert np.mean(np.asarray(got.values) != np.asarray(want.values)) < 2e-3
    np.testing.assert_allclose(np.asarray(got.scale), np.asarray(want.scale), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got.dequantize()), np.asarray(want.dequantize()), atol=float(np.max(want.scale)) * 1.01)
    # the plain-input Hessian gives different weights when there is a rotation (the test can tell)
    if transform:
        x0 = x @ q.T
        other, _ = gptq_quantize(kernel, 2.0 / len(x0) * x0.T @ x0, spec)
        assert np.mean(np.asarray(got.values) != np.asarray(other.values)) > 0.05


def test_yaml_pipeline_then_quantize_keeps_gptq_weights(model):
    weight = {**INT4_CHANNEL, "symmetric": False}
    steps = [Step.from_config({"gptq": {"weight": weight, "pattern": r".*(q|k|v|o)_proj"}}, "steps.0", "test"),
             Step.from_config({"quantize": {"rules": [{"pattern": "lm_head", "skip": True},
                                                      {"weight": weight, "act": {"format": "int8", "granularity": "token"}}]}},
                              "steps.1", "test")]  # fmt: skip
    steps[0].check(model)
    ctx = _ctx()
    gptq = gptq_step.gptq_step(nnx.clone(model), steps[0].config, ctx)
    assert ctx.metrics["gptq_linears"] == 8  # attention only: the MLP linears are left to RTN
    final, _ = run_steps(model, steps, _ctx())
    before, after = quantized_ops(gptq), quantized_ops(final)
    assert sorted(before) == sorted(p for p in after if "_attn." in p)
    for path, op in after.items():
        assert op.rule.act is not None and op.mode == "ptq"
        if path in before:
            a, b = op.kernel.get_value(), before[path].kernel.get_value()
            for f in ("values", "scale", "zero_point"):
                np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))
    assert "lm_head" not in after
    rtn_then_act = run_steps(model, steps[1:], _ctx())[0]
    assert rel_err(final(ids()), model(ids())) < rel_err(rtn_then_act(ids()), model(ids()))


def test_act_order_with_static_groups_runs_and_beats_rtn(model):
    ctx = _ctx()
    gptq = _gptq(model, INT3_G16, ctx, act_order=True, static_groups=True, block_size=32)
    assert ctx.metrics["gptq_linears"] == 14
    ref = model(ids())
    assert rel_err(gptq(ids()), ref) < rel_err(_rtn(model, INT3_G16)(ids()), ref)


def test_bad_configs_are_refused_before_work(model):
    def check(weight, **kw):
        gptq_step.check(model, gptq_step.GPTQConfig(weight=SpecConfig(**weight), **kw))

    with pytest.raises(ValueError, match=r"group size 128 is larger than the input dimension 64 of layers.0.self_attn.q_proj"):
        check({"format": "int4", "granularity": "group", "group_size": 128}, act_order=True, static_groups=True)
    with pytest.raises(ValueError, match="act_order with input groups of 16 needs static_groups=True"):
        check(INT3_G16, act_order=True)
    with pytest.raises(ValueError, match="matches no linear of the decoder layers"):
        check(INT3_G16, pattern="lm_head")
    check(INT3_G16, act_order=True, static_groups=True)  # fine
    with pytest.raises(ValueError, match="already holds a packed weight"):
        gptq_step.check(_rtn(model, INT3_G16), gptq_step.GPTQConfig(weight=SpecConfig(**INT3_G16)))
    with pytest.raises(ValueError, match="damp > 0"):
        gptq_step.GPTQConfig(weight=SpecConfig(**INT3_G16), damp=0.0)


def test_hessian_that_stays_indefinite_names_the_layer(model, monkeypatch):
    monkeypatch.setattr(stats, "hessian", lambda state: -jnp.eye(state["sum"].shape[0]))
    with pytest.raises(ValueError, match=r"GPTQ for 'layers.0.self_attn.q_proj'.*not positive definite"):
        _gptq(model, INT4_CHANNEL)


def test_after_rotate_with_online_hadamards(model):
    """rotate (online Hadamards before o_proj and down_proj) → gptq: the transforms stay and GPTQ beats RTN."""
    rotate = Step.from_config({"rotate": {"online_o_proj": True}}, "steps.0", "test")
    gptq = Step.from_config({"gptq": {"weight": INT3_G16}}, "steps.1", "test")
    rtn = Step.from_config({"quantize": {"rules": [{"pattern": r"layers\..*", "weight": INT3_G16}]}}, "steps.1", "test")
    g, r = run_steps(model, [rotate, gptq], _ctx())[0], run_steps(model, [rotate, rtn], _ctx())[0]
    ops = quantized_ops(g)
    assert all(ops[f"layers.{i}.{p}"].input_transform is not None for i in (0, 1) for p in ("self_attn.o_proj", "mlp.down_proj"))
    ref = model(ids())
    assert rel_err(g(ids()), ref) < 0.9 * rel_err(r(ids()), ref)

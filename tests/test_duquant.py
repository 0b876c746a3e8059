"""DuQuant step: exact in float on llama/qwen2/opt/gpt2, smoothing equal to a numpy reference, W4A4 gain, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tests.hf_tiny import ids, load_tiny, rel_err

from qjax.experiments import stats
from qjax.experiments.pipeline import Context, Step, run_steps
from qjax.experiments.schema import ConfigError
from qjax.models.structure import family_of
from qjax.numerics import QArray
from qjax.numerics.linear_maps import ChannelScale, Compose, Permutation, Rotation
from qjax.transforms.nnx_quantize import quantized_ops

CAL = np.random.default_rng(5).integers(0, 97, (6, 32))  # 3 batches of 2 windows, ids < 97
W4A4 = {"quantize": {"rules": [{"pattern": r"layers\..*", "weight": {"format": "int4", "granularity": "channel"},
                                "act": {"format": "int4", "granularity": "token"}}]}}  # fmt: skip


def step(body: dict | str, i: int = 0) -> Step:
    return Step.from_config(body, f"steps.{i}", "x.yaml")


def run(model, *bodies, key: int = 0, cal=CAL):
    ctx = Context(key=jax.random.key(key), calibration=cal, batch_size=2, progress=False)
    return run_steps(model, [step(b, i) for i, b in enumerate(bodies)], ctx)[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> tiny HF model with outlier channels, loaded once per module (steps work on copies)."""
    cache = {}
    return lambda family: cache.get(family) or cache.setdefault(family, load_tiny(tmp_path_factory.mktemp(family), family))


def transform(op):
    return op.input_transform.get_value()


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
@pytest.mark.parametrize("shared", [False, True])
def test_float_logits_unchanged_and_every_linear_transformed(models, family, shared):
    model = models(family)
    ref = model(ids())
    out = run(model, {"duquant": {"block": 32, "shared": shared}})
    assert rel_err(out(ids()), ref) < 1e-4
    fam = family_of(out)
    for i in range(2):
        ops = {p: o for p, o in quantized_ops(out).items() if p.startswith(fam.layer_path(i) + ".")}
        assert sorted(ops) == sorted(fam.layer_path(i, p) for p in fam.linears)  # every linear has an online map
        q = transform(ops[fam.layer_path(i, fam.groups(out)[0].consumers[0])])  # q_proj / c_attn
        assert isinstance(q, Compose) and [type(m) for m in q.maps] == [Rotation, Permutation, Rotation]
        r1 = np.asarray(q.maps[0].blocks)
        assert r1.shape == (2, 32, 32)  # hidden 64 in blocks of 32
        np.testing.assert_allclose(r1 @ np.swapaxes(r1, 1, 2), np.broadcast_to(np.eye(32), r1.shape), atol=1e-5)
        assert np.array_equal(r1[0], r1[1]) == shared  # one rotation shared by the blocks vs one per block
        assert not np.allclose(r1[0], np.eye(32), atol=0.1)
    if family in ("opt", "gpt2"):  # fc2 / mlp.c_proj: no producer can absorb Λ (an activation between), all online
        assert type(transform(ops[fam.layer_path(1, fam.linears[-1])]).maps[0]) is ChannelScale
    assert rel_err(model(ids()), ref) == 0.0  # the input model was not modified


def test_activation_rows_and_norm_targets_keep_the_function(models):
    model = models("llama")
    ref = model(ids())
    out = run(model, {"duquant": {"block": 16, "calib": "activations"}})
    assert rel_err(out(ids()), ref) < 1e-4
    norms = run(model, {"duquant": {"targets": "norms"}})
    assert rel_err(norms(ids()), ref) < 1e-4
    rel = {p.split(".", 2)[2] for p in quantized_ops(norms)}
    assert rel == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"}
    assert isinstance(norms.layers[0].self_attn.o_proj, nnx.Linear)


def test_smoothing_scales_match_numpy_reference(models):
    """Λ of the norm group (numpy RMSNorm of the embeddings) and of the GQA v→o group (max over repeats)."""
    alpha = 0.6
    model = models("llama")
    out = run(model, {"duquant": {"alpha": alpha, "block": 32}})
    old, new = model.layers[0], out.layers[0]

    def smooth(a, w):
        return np.maximum(np.maximum(a, 1e-5) ** alpha / np.maximum(w, 1e-5) ** (1 - alpha), 1e-5)

    def kernel(mod):
        return np.asarray(mod.kernel.get_value(), np.float64)

    h = np.asarray(model.embed_tokens.embedding.get_value(), np.float64)[CAL]
    gain = np.asarray(old.input_layernorm.scale.get_value(), np.float64)
    x = h / np.sqrt((h**2).mean(-1, keepdims=True) + model.config.rms_norm_eps) * gain
    w = np.max([np.abs(kernel(getattr(old.self_attn, n))).max(1) for n in ("q_proj", "k_proj", "v_proj")], axis=0)
    s_norm = smooth(np.abs(x).reshape(-1, 64).max(0), w)
    np.testing.assert_allclose(gain / np.asarray(new.input_layernorm.scale.get_value()), s_norm, rtol=1e-4)

    # v_proj outputs are divided by s_p, s_p from o_proj statistics reduced over the 2 query heads per KV head
    a_o = np.asarray(stats.collect(model, [CAL], r"layers\.0\.self_attn\.o_proj", stats.absmax())["layers.0.self_attn.o_proj"])
    w_o = np.abs(kernel(old.self_attn.o_proj)).max(1)

    def per_kv(v):  # o_proj channel h·16 + d reads v channel (h // 2)·16 + d
        return v.reshape(2, 2, 16).max(1).ravel()

    s_v = smooth(per_kv(a_o), per_kv(w_o))
    hidden = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5, 64)), jnp.float32)
    v_old = np.asarray(old.self_attn.v_proj(old.input_layernorm(hidden)), np.float64)
    v_new = np.asarray(new.self_attn.v_proj(new.input_layernorm(hidden)), np.float64)
    np.testing.assert_allclose(v_old / s_v, v_new, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("shared", [False, True])
def test_w4a4_error_below_rtn_and_smoothquant_and_transforms_kept(models, family, shared):
    model = models(family)
    ref = model(ids())
    rtn = run(model, W4A4)
    smooth_only = run(model, {"duquant": {"block": 32, "steps": 0, "permute": False}}, W4A4)  # identity rotations
    du = run(model, {"duquant": {"block": 32, "shared": shared}}, W4A4)
    errs = {k: rel_err(m(ids()), ref) for k, m in (("rtn", rtn), ("sq", smooth_only), ("du", du))}
    assert errs["du"] < errs["sq"] < errs["rtn"], errs
    ops = quantized_ops(du)
    assert len(ops) == 14
    for path, op in ops.items():
        assert op.mode == "ptq" and isinstance(op.kernel.get_value(), QArray), path
        assert isinstance(transform(op), Compose) and type(transform(op).maps[0]) is Rotation, path


def test_deterministic_for_a_key(models):
    model = models("llama")

    def rotations(m):
        return [np.asarray(transform(o).maps[0].blocks) for o in quantized_ops(m).values()]

    a, b, c = (rotations(run(model, {"duquant": {"block": 32}}, key=k)) for k in (0, 0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.allclose(x, z) for x, z in zip(a, c, strict=True))


def test_clear_errors(models):
    model = models("llama")
    with pytest.raises(ValueError, match="block 48 does not divide hidden size 64"):
        step({"duquant": {"block": 48}}).check(model)
    with pytest.raises(ValueError, match=r"block 96 does not divide .*intermediate size 128"):
        run(model, {"duquant": {"block": 96}})
    for bad in ({"alpha": 1.5}, {"calib": "mean"}, {"targets": "mlp"}, {"block": 1}):
        with pytest.raises(ConfigError, match="duquant"):
            step({"duquant": bad})
    with pytest.raises(ValueError, match="duquant needs a model with a structure map"):
        step("duquant").check(nnx.Linear(64, 64, rngs=nnx.Rngs(0)))
    broken = nnx.clone(model)
    table = broken.embed_tokens.embedding
    table.set_value(table.get_value().at[int(CAL[0, 0])].set(jnp.inf))
    with pytest.raises(ValueError, match=r"duquant \(layer 0\).*non-finite"):
        run(broken, "duquant")


def test_consumers_of_one_input_share_one_stored_map(tmp_path):
    import qjax
    from qjax.experiments.basic_steps import weight_bytes

    model = load_tiny(tmp_path, "llama")
    cal = np.asarray(ids())
    out, _ = run_steps(model, [Step.from_config({"duquant": {"block": 32}}, "steps.0", "x.yaml")],
                       Context(key=jax.random.key(0), calibration=cal, batch_size=2, progress=False))  # fmt: skip
    attn = out.layers[0].self_attn
    assert attn.q_proj.input_transform is attn.k_proj.input_transform is attn.v_proj.input_transform
    assert out.layers[0].mlp.gate_proj.input_transform is out.layers[0].mlp.up_proj.input_transform

    def nbytes(op):
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(op.input_transform.get_value()))

    stored = qjax.param_bytes(out) - weight_bytes(out)
    distinct = sum(nbytes(op) for lay in out.layers
                   for op in (lay.self_attn.q_proj, lay.self_attn.o_proj, lay.mlp.gate_proj, lay.mlp.down_proj))  # fmt: skip
    every_consumer = distinct + sum(nbytes(op) for lay in out.layers
                                    for op in (lay.self_attn.k_proj, lay.self_attn.v_proj, lay.mlp.up_proj))  # fmt: skip
    assert stored == distinct < every_consumer  # one stored map per group, counted once

"""Structure maps: layer-by-layer execution equals the model; folding a scale/shift is exact in float."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tests.hf_tiny import ids, load_tiny, rel_err

from qjax.experiments import stats
from qjax.models.structure import can_shift, family_of, fold_scale, fold_shift, get_module, group_width, unstack_layers


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_layerwise_forward_and_folding_are_exact(tmp_path, family):
    model = load_tiny(tmp_path, family)
    fam = family_of(model)
    ref = model(ids())
    np.testing.assert_allclose(np.asarray(fam.forward(model, ids())), np.asarray(ref), rtol=1e-6, atol=1e-6)
    rng = np.random.default_rng(1)
    for layer in fam.layers(model):
        for g in fam.groups(model):
            width = group_width(layer, g)
            fold_scale(layer, g, jnp.asarray(rng.uniform(0.3, 3.0, width), jnp.float32))
            if can_shift(layer, g):
                fold_shift(layer, g, jnp.asarray(rng.normal(size=width), jnp.float32))
    assert rel_err(model(ids()), ref) < 1e-5


def test_gqa_value_to_output_group_repeats_the_scale(tmp_path):
    model = load_tiny(tmp_path, "llama")  # 4 heads, 2 KV heads, head_dim 16
    g = family_of(model).groups(model)[1]
    assert g.producer == "self_attn.v_proj" and g.repeat == 2
    idx = g.consumer_index(64)
    np.testing.assert_array_equal(idx[:32], np.r_[0:16, 0:16])
    np.testing.assert_array_equal(idx[32:], np.r_[16:32, 16:32])
    assert group_width(model.layers[0], g) == 32


def test_shift_needs_biases_and_unsupported_family_is_named(tmp_path):
    model = load_tiny(tmp_path, "llama")
    fam = family_of(model)
    with pytest.raises(ValueError, match="no bias"):
        fold_shift(model.layers[0], fam.groups(model)[0], jnp.zeros(64))
    with pytest.raises(ValueError, match="smoothquant needs a model with a structure map"):
        family_of(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), "smoothquant")


def test_unstack_scanned_llama_and_collect_per_layer(tmp_path):
    scanned = load_tiny(tmp_path, "llama", scan_layers=True)
    flat = unstack_layers(scanned)
    np.testing.assert_allclose(np.asarray(flat(ids())), np.asarray(scanned(ids())), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unstack_layers"):
        family_of(scanned).layers(scanned)
    # collect() unstacks on its own copy: per-layer paths, statistics equal to the unrolled model's
    a = stats.collect(scanned, [ids()], r"layers\.\d+\.mlp\.down_proj", stats.absmax())
    b = stats.collect(flat, [ids()], r"layers\.\d+\.mlp\.down_proj", stats.absmax())
    assert sorted(a) == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-5)


def test_collect_observers_against_numpy(tmp_path):
    model = load_tiny(tmp_path, "opt", outliers=False)
    x_seen = {}

    # reference: the input of fc1 is final_layer_norm(h) of layer 0; capture it with a layer-by-layer run
    fam = family_of(model)
    h, aux = fam.embed(model, ids())
    layer = model.layers[0]
    attn_in = layer.self_attn_layer_norm(h)
    h2 = h + layer.self_attn(attn_in, aux[0])
    x_seen["fc1"] = np.asarray(layer.final_layer_norm(h2), np.float64).reshape(-1, 64)
    obs = stats.combine(absmax=stats.absmax(), minmax=stats.minmax(), mean=stats.mean_abs(), xtx=stats.xtx())
    batches = [ids()[:2], ids()[2:]]
    got = stats.collect(model, batches, r"layers\.0\.fc1", obs)["layers.0.fc1"]
    x = x_seen["fc1"]
    np.testing.assert_allclose(np.asarray(got["absmax"]), np.abs(x).max(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got["minmax"]["min"]), x.min(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.mean_of(got["mean"])), np.abs(x).mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.hessian(got["xtx"])), 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-5)
    hist = stats.collect(model, batches, r"layers\.0\.fc1", stats.histogram(64),
                         initial={"layers.0.fc1": stats.histogram_start(got["absmax"], 64)})["layers.0.fc1"]
    ref, _ = np.histogram(np.minimum(np.abs(x), np.abs(x).max() * (1 - 1e-7)), bins=64, range=(0, np.abs(x).max()))
    assert abs(int(np.asarray(hist.counts).sum()) - x.size) == 0
    assert np.abs(np.asarray(hist.counts) - ref).sum() <= 4  # bin-edge rounding only
    with pytest.raises(ValueError, match="no module path matches"):
        stats.collect(model, batches, r"nothing", stats.absmax())
    with pytest.raises(ValueError, match="non-finite"):
        stats.check_finite({"a": jnp.array([1.0, jnp.nan])}, "smoothquant")
    emb = model.embed_tokens.embedding
    emb.set_value(emb.get_value().at[int(ids()[0, 0])].set(jnp.nan))
    with pytest.raises(ValueError, match=r"gptq: the input of layers.0.fc1 contains \d+ NaN/Inf"):
        stats.collect(model, batches, r"layers\.0\.fc1", stats.absmax(), desc="gptq")

"""QuaRot-style rotation step: function-preserving in float, flattens outliers, lowers W4A4 error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tests.hf_tiny import V, ids, load_tiny, rel_err

import qjax
import qjax.numerics as qn
from qjax.experiments.pipeline import Context, Step, run_steps
from qjax.experiments.rotate import RotateConfig, check, rotate
from qjax.experiments.schema import ConfigError
from qjax.models.structure import family_of
from qjax.transforms import quantized_ops

D, FFN, LAYERS, HEADS, HEAD_DIM = 64, 128, 2, 4, 16


def _rotate(model, key=0, **kw):
    return rotate(nnx.clone(model), RotateConfig(**kw), Context(key=jax.random.key(key), progress=False))


def _w4a4(model):
    rule = qjax.Rule(r"layers\..*", op="dot_general", weight=qn.QuantSpec("int4", qn.per_axis(1)),
                     act=qn.QuantSpec("int4", qn.per_token()))  # fmt: skip
    return qjax.quantize(model, qjax.Recipe((rule,)), "ptq")


def _outlier_ratios(model) -> tuple[float, float]:
    """max|·| / mean|·| of the residual stream h after layer 0, and of what layer 1's q/k/v read (its norm of h)."""
    fam = family_of(model)
    x, aux = fam.embed(model, ids())
    h = fam.call_layer(model.layers[0], x, aux)
    ratio = lambda t: float(np.abs(np.asarray(t, np.float64)).max() / np.abs(np.asarray(t, np.float64)).mean())  # noqa: E731
    return ratio(h), ratio(model.layers[1].input_layernorm(h))


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen2"])
def test_float_logits_unchanged(tmp_path, family, kind, online):
    model = load_tiny(tmp_path, family)
    ref = model(ids())
    out = _rotate(model, kind=kind, online_down_proj=online, online_o_proj=online, online_qk=online)
    assert rel_err(out(ids()), ref) < 1e-4
    assert (out.layers[0].self_attn.attn.qk_transform is not None) == online
    # norms folded, head untied, and the embedding really rotated: E_new = E_old Q with Q orthogonal
    for norm in [out.norm] + [m for layer in out.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]:
        np.testing.assert_array_equal(np.asarray(norm.scale.get_value()), 1.0)
    assert out.lm_head is not None and not out.config.tie_word_embeddings
    e0 = np.asarray(model.embed_tokens.embedding.get_value(), np.float64)
    q = np.linalg.lstsq(e0, np.asarray(out.embed_tokens.embedding.get_value(), np.float64), rcond=None)[0]
    np.testing.assert_allclose(q @ q.T, np.eye(D), atol=1e-4)
    assert np.abs(q - np.eye(D)).max() > 0.1
    if kind == "hadamard":  # d = 64 = 2^6: a signed Sylvester Hadamard, every entry ±1/8
        np.testing.assert_allclose(np.abs(q), 1 / 8, atol=1e-4)
    else:
        assert np.abs(q).std() > 0.03
    ops = quantized_ops(out)
    assert ("layers.0.mlp.down_proj" in ops) == online and ("layers.1.self_attn.o_proj" in ops) == online


def test_scanned_model_is_unstacked_and_rotated(tmp_path):
    model = load_tiny(tmp_path, "llama", scan_layers=True)
    out = _rotate(model, online_o_proj=True)
    assert not out.config.scan_layers
    assert rel_err(out(ids()), model(ids())) < 1e-4


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_rotation_flattens_the_residual_outliers(tmp_path, kind):
    # hf_tiny's outliers live in the norm gains (channels 3, 17 ×25, ×8): the residual stream h itself is
    # near-Gaussian, and its normed copy (the linears' input) carries the outlier channels.
    model = load_tiny(tmp_path, "llama", outliers=True)
    (h0, n0), (h1, n1) = _outlier_ratios(model), _outlier_ratios(_rotate(model, kind=kind))
    assert n0 > 20 and n1 < n0 / 4, (n0, n1)  # measured: 34 → ~4
    assert h1 < h0, (h0, h1)  # measured: 9.0 → ~7.5


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_w4a4_error_is_lower_after_rotation_and_online_transforms_survive(tmp_path, kind):
    model = load_tiny(tmp_path, "llama", outliers=True)
    ref = model(ids())
    rotated = _rotate(model, kind=kind, online_o_proj=True)
    base_err, rot_err = rel_err(_w4a4(model)(ids()), ref), rel_err(_w4a4(rotated)(ids()), ref)
    # measured (key 0): 0.56 → 0.30 (hadamard), 0.43 (orthogonal); over keys 0–3 at most 0.41 / 0.44
    assert rot_err < {"hadamard": 0.75, "orthogonal": 0.85}[kind] * base_err, (base_err, rot_err)
    ops = quantized_ops(_w4a4(rotated))
    for i in range(LAYERS):
        for rel in ("mlp.down_proj", "self_attn.o_proj"):
            op = ops[f"layers.{i}.{rel}"]
            assert op.input_transform is not None and op.rule.weight is not None and op.mode == "ptq"
    assert "lm_head" not in ops and "embed_tokens" not in ops


def test_param_bytes_count_untied_head_and_online_transforms(tmp_path):
    model = load_tiny(tmp_path, "llama_tied")
    before = qjax.param_bytes(model)
    plain = _rotate(model, online_down_proj=False)
    assert qjax.param_bytes(plain) - before == V * D * 4  # the untied head
    online = _rotate(model, online_o_proj=True)
    down = FFN + 1  # signs + 1×1 mix of the 128 = 1·2^7 Hadamard
    heads = HEADS * HEAD_DIM * HEAD_DIM  # block-diagonal per-head Hadamard
    assert qjax.param_bytes(online) - before == V * D * 4 + LAYERS * (down + heads) * 4


def test_tied_head_without_untying_is_refused_when_the_final_gain_is_not_one(tmp_path):
    model = load_tiny(tmp_path, "llama_tied", outliers=True)
    with pytest.raises(ValueError, match="rotate: tied embeddings with untie_head=False"):
        check(model, RotateConfig(untie_head=False))
    model.norm.scale.set_value(jnp.ones_like(model.norm.scale.get_value()))  # γ = 1: the shared table rotates exactly
    out = _rotate(model, untie_head=False)
    assert out.lm_head is None and rel_err(out(ids()), model(ids())) < 1e-4


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_layernorm_families_are_refused(tmp_path, family):
    model = load_tiny(tmp_path, family)
    with pytest.raises(ValueError, match=f"rotate: the {family} family uses LayerNorm"):
        check(model, RotateConfig())
    with pytest.raises(ValueError, match=f"rotate: the {family} family uses LayerNorm"):
        _rotate(model)
    with pytest.raises(ValueError, match="rotate needs a model with a structure map"):
        check(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), RotateConfig())


def test_pipeline_step_is_deterministic_and_validated(tmp_path):
    model = load_tiny(tmp_path, "qwen2")
    step = Step.from_config({"rotate": {}}, "steps.0", "x.yaml")
    assert step.config == RotateConfig()
    step.check(model)

    def run(seed):
        return run_steps(model, [step], Context(key=jax.random.key(seed), progress=False))[0]

    a, b, c = run(0), run(0), run(1)
    flat = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))  # noqa: E731
    for x, y in zip(flat(a), flat(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.allclose(np.asarray(a.embed_tokens.embedding.get_value()), np.asarray(c.embed_tokens.embedding.get_value()))
    assert rel_err(a(ids()), model(ids())) < 1e-4 and model.config.tie_word_embeddings == a.config.tie_word_embeddings
    with pytest.raises(ConfigError, match="kind"):
        Step.from_config({"rotate": {"kind": "givens"}}, "steps.0", "x.yaml")

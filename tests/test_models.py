"""Model families: logits parity with Hugging Face transformers (torch, fp32) on tiny random checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import qjax  # noqa: E402
import qjax.models as qm  # noqa: E402
import qjax.numerics as qn  # noqa: E402

V = 97
IDS = np.random.default_rng(0).integers(0, V, (2, 13))

CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "opt": (transformers.OPTConfig, transformers.OPTForCausalLM, dict(
        hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),
}  # fmt: skip


def _save(tmp_path, name, max_shard_size=None):
    cfg_cls, model_cls, kw = CASES[name]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(vocab_size=V, **kw)).eval()
    path = tmp_path / name
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits.numpy()
    return model, path, logits


@pytest.mark.parametrize("name", list(CASES))
def test_causal_lm_logits_match_transformers(tmp_path, name):
    _, path, ref = _save(tmp_path, name)
    model, _ = qm.load_pretrained(path)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))), ref, rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint_with_index_and_greedy_generation(tmp_path):
    hf, path, ref = _save(tmp_path, "llama", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").exists()
    model, _ = qm.load_pretrained(path)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))), ref, rtol=1e-4, atol=1e-4)
    out = qm.generate(model, jnp.asarray(IDS[:, :5]), 6)
    expected = hf.generate(torch.tensor(IDS[:, :5]), attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=6,
                           do_sample=False, pad_token_id=0).numpy()  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out), expected)
    sampled = qm.generate(model, jnp.asarray(IDS[:, :5]), 4, key=jax.random.key(0), temperature=1.0)
    assert sampled.shape == (2, 9)


def test_bert_hidden_states_and_mean_pooling_match_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    hf = transformers.BertModel(cfg).eval()
    hf.save_pretrained(tmp_path / "bert")
    mask = np.ones_like(IDS)
    mask[1, 9:] = 0
    with torch.no_grad():
        ref = hf(torch.tensor(IDS), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    model, _ = qm.load_pretrained(tmp_path / "bert")
    h = np.asarray(model(jnp.asarray(IDS), jnp.asarray(mask)))
    np.testing.assert_allclose(h[mask.astype(bool)], ref[mask.astype(bool)], rtol=1e-4, atol=1e-4)
    pooled = (ref * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(model.embed(jnp.asarray(IDS), jnp.asarray(mask))), pooled, rtol=1e-4, atol=1e-5)


def test_quantized_loaded_model_targets_hf_paths(tmp_path):
    _, path, ref = _save(tmp_path, "llama")
    model, _ = qm.load_pretrained(path)
    recipe = [qjax.Rule(r"layers\.\d+\.mlp\.down_proj", weight=qn.QuantSpec("int8", qn.per_axis(1)))]
    q = qjax.quantize(model, recipe, "ptq")
    ops = qjax.transforms.quantized_ops(q)
    assert sorted(ops) == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    np.testing.assert_allclose(np.asarray(q(jnp.asarray(IDS))), ref, rtol=0.05, atol=0.05)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    _, path, _ = _save(tmp_path, "qwen2")
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        qm.load_pretrained(tmp_path / "missing" / "dir")
    cfg = json.loads((path / "config.json").read_text())
    bad = dict(cfg, hidden_size=32)
    (path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="shape"):
        qm.load_pretrained(path)
    (path / "config.json").write_text(json.dumps(dict(cfg, model_type="mamba")))
    with pytest.raises(ValueError, match="unknown architecture model_type='mamba'"):
        qm.load_pretrained(path)
    (path / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    with pytest.raises(ValueError, match="no tensor for parameter"):
        qm.load_pretrained(path)


def test_bf16_parameters_load_and_quantize(tmp_path):
    _, path, ref = _save(tmp_path, "llama")
    model, _ = qm.load_pretrained(path, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    logits = model(jnp.asarray(IDS))
    assert logits.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(logits, np.float32), ref, rtol=0.05, atol=0.05)
    rule = qjax.Rule(op="dot_general", weight=qn.QuantSpec("int8", qn.per_axis(1)), act=qn.QuantSpec("int8", qn.per_token()))
    served = qjax.quantize(model, [rule], "serve")
    out = np.asarray(served(jnp.asarray(IDS)), np.float32)
    assert np.isfinite(out).all() and np.abs(out - ref).max() < 0.1


def test_scanned_layers_match_transformers_and_quantize_like_unrolled(tmp_path):
    _, path, ref = _save(tmp_path, "llama")
    scanned, cfg = qm.load_pretrained(path, scan_layers=True)
    assert cfg.scan_layers and scanned.layers.mlp.up_proj.kernel[...].shape == (2, 64, 96)
    np.testing.assert_allclose(np.asarray(scanned(jnp.asarray(IDS))), ref, rtol=1e-4, atol=1e-4)
    unrolled, _ = qm.load_pretrained(path)
    rule = qjax.Rule(op="dot_general", weight=qn.QuantSpec("int4", qn.per_group(0, 32)), act=qn.QuantSpec("int8", qn.per_token()))
    for mode in ("ptq", "serve"):
        a = qjax.quantize(scanned, [rule], mode)(jnp.asarray(IDS))
        b = qjax.quantize(unrolled, [rule], mode)(jnp.asarray(IDS))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no option"):
        qm.load_pretrained(path, scan_layer=True)
    with pytest.raises(NotImplementedError, match="scan_layers=False"):
        qm.generate(scanned, jnp.asarray(IDS[:, :3]), 2)


def test_opt_greedy_generation_with_kv_cache_matches_transformers(tmp_path):
    hf, path, _ = _save(tmp_path, "opt")
    model, _ = qm.load_pretrained(path)
    out = qm.generate(model, jnp.asarray(IDS[:, :5]), 6)
    expected = hf.generate(torch.tensor(IDS[:, :5]), attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=6,
                           do_sample=False, pad_token_id=0).numpy()  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out), expected)

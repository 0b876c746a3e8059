"""Tiny random Hugging Face checkpoints (transformers + torch) loaded into qjax, for method tests.

`load_tiny(tmp_path, family, outliers=True)` saves a random model with transformers and loads it with
qjax. With `outliers`, a few residual channels are amplified in every norm's gain (as trained LLMs have
massive activation channels), so outlier methods have something to fix.
"""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import qjax.models as qm  # noqa: E402

V = 97
IDS = np.random.default_rng(0).integers(0, V, (4, 16))

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "llama_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                   dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        tie_word_embeddings=True)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "opt": (transformers.OPTConfig, transformers.OPTForCausalLM,
            dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),
}  # fmt: skip


def load_tiny(tmp_path, family: str, outliers: bool = True, **load_options):
    cfg_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(0)
    hf = model_cls(cfg_cls(vocab_size=V, **kw)).eval()
    if outliers:
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if p.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                    p[3] *= 25.0
                    p[17] *= 8.0
    path = tmp_path / family
    hf.save_pretrained(path)
    model, _ = qm.load_pretrained(path, **load_options)
    return model


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def ids():
    return jnp.asarray(IDS)

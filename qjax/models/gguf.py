"""Load Llama-family GGUF files (llama.cpp) into qjax: weights dequantized to float32 with the `gguf` package."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from qjax.models.hf import fill_state, llama_name
from qjax.models.llama import LlamaConfig, LlamaForCausalLM

_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's conversion-time row permutation of Q/K projections (its RoPE pairs adjacent rows)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _meta(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader) -> LlamaConfig:
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unknown GGUF architecture {arch!r}; qjax reads 'llama' GGUF files")
    p = "llama."
    vocab = _meta(reader, p + "vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=int(vocab), hidden_size=int(_meta(reader, p + "embedding_length")),
        intermediate_size=int(_meta(reader, p + "feed_forward_length")), num_hidden_layers=int(_meta(reader, p + "block_count")),
        num_attention_heads=int(_meta(reader, p + "attention.head_count")),
        num_key_value_heads=int(_meta(reader, p + "attention.head_count_kv", _meta(reader, p + "attention.head_count"))),
        rms_norm_eps=float(_meta(reader, p + "attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_meta(reader, p + "rope.freq_base", 10000.0)), tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(_meta(reader, p + "context_length", 4096)),
    )  # fmt: skip


def load_gguf(path: str | os.PathLike, *, param_dtype=jnp.float32, sharding_fn=None):
    """(model, config, tokenizer) from a Llama GGUF file; quantized tensors are dequantized (the GGUF's
    values become the model's reference weights)."""
    import gguf
    from flax import nnx

    from qjax.data.tokenizers import tokenizer_from_gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
    cfg = config_from_gguf(reader)
    tensors = {}
    for t in reader.tensors:
        name = t.name
        if name.startswith("blk."):
            _, layer, kind, leaf = name.split(".")
            if kind not in _BLOCK:
                continue
            hf = f"model.layers.{layer}.{_BLOCK[kind]}.{leaf}"
        elif name in _GGUF_TO_HF:
            hf = _GGUF_TO_HF[name]
        else:
            continue
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        if kind_is(name, "attn_q"):
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif kind_is(name, "attn_k"):
            w = unpermute_qk(w, cfg.kv_heads)
        tensors[hf] = w
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    model = fill_state(abstract, tensors, llama_name, param_dtype=param_dtype, sharding_fn=sharding_fn, source=path)
    return model, cfg, tokenizer_from_gguf(reader)


def kind_is(name: str, kind: str) -> bool:
    return name.startswith("blk.") and name.split(".")[2] == kind

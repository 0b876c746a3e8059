"""Llama family in Flax NNX: Llama 2/3, Mistral, Qwen2 (q/k/v biases), SmolLM2.

Module paths follow Hugging Face names (`layers.3.self_attn.q_proj`, `layers.3.mlp.down_proj`) so that
quantization rules and checkpoints line up.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from qjax.models.common import CausalSelfAttention, KVCacheDecoder, RopeScaling, rope_frequencies


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: True (q/k/v only)
    mlp_bias: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    scan_layers: bool = False  # stack the layers' parameters and run them with nnx.scan (one compiled layer)

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict) -> LlamaConfig:
        model_type = d.get("model_type", "llama")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["rope_scaling"] = RopeScaling.from_hf(d.get("rope_scaling"))
        if model_type == "qwen2":
            kw["attention_bias"] = True
        if d.get("rope_parameters"):  # transformers 5 moves theta/scaling here
            rp = d["rope_parameters"]
            kw["rope_theta"] = rp.get("rope_theta", kw.get("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default":
                kw["rope_scaling"] = RopeScaling.from_hf(rp)
        if kw.get("hidden_act", "silu") not in ("silu", "swish"):
            raise NotImplementedError(f"Llama-family activation {kw['hidden_act']!r} is not supported")
        return cls(**kw)


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, dtype, param_dtype, rngs: nnx.Rngs):
        lin = lambda i, o: nnx.Linear(i, o, use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # noqa: E731
        self.gate_proj = lin(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = lin(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = lin(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = nnx.RMSNorm(cfg.hidden_size, epsilon=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = CausalSelfAttention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head, qkv_bias=cfg.attention_bias,
            out_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.post_attention_layernorm = nnx.RMSNorm(cfg.hidden_size, epsilon=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype, param_dtype, rngs)

    def __call__(self, x, positions, inv_freq, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), positions, inv_freq, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(KVCacheDecoder, nnx.Module):
    """Decoder-only Llama-family LM: `model(ids) -> logits (B, T, vocab)`."""

    def __init__(self, cfg: LlamaConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs):
                return DecoderLayer(cfg, dtype, param_dtype, rngs)

            self.layers = stacked(rngs)  # one DecoderLayer whose parameters have a leading layer axis
        else:
            self.layers = nnx.List([DecoderLayer(cfg, dtype, param_dtype, rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = nnx.RMSNorm(cfg.hidden_size, epsilon=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = nnx.data(None)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, ids: jax.Array, positions: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        cfg = self.config
        x = self.embed_tokens(ids)
        inv_freq = rope_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)  # constant-folded under jit
        if cfg.scan_layers:

            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def run_layers(layer, x):
                return layer(x, positions, inv_freq, mask)

            x = run_layers(self.layers, x)
        else:
            for layer in self.layers:
                x = layer(x, positions, inv_freq, mask)
        x = self.norm(x)
        return self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32, spec=None) -> None:
        if self.config.scan_layers:
            raise NotImplementedError("KV-cache decoding runs layer by layer; load the model with scan_layers=False")
        super().init_cache(batch, max_len, dtype, spec)

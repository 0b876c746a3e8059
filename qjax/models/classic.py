"""OPT and GPT-2 (decoders) and BERT (encoder, mean pooling) in Flax NNX, with HF module names."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from qjax.layers import AttentionOp
from qjax.models.common import CausalSelfAttention, KVCacheDecoder


class _FromHF:
    """`from_hf(config.json dict)`: keep the keys that are fields of the config dataclass."""

    @classmethod
    def from_hf(cls, d: dict):
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def _ln(d, eps, dtype, param_dtype, rngs):
    return nnx.LayerNorm(d, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


# ---- OPT -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OPTConfig(_FromHF):
    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    enable_bias: bool = True
    activation_function: str = "relu"
    layer_norm_eps: float = 1e-5  # HF OPT uses nn.LayerNorm's default



class OPTLayer(nnx.Module):
    def __init__(self, cfg: OPTConfig, dtype, param_dtype, rngs):
        d, h = cfg.hidden_size, cfg.num_attention_heads
        self.pre_ln = cfg.do_layer_norm_before
        self.self_attn = CausalSelfAttention(d, h, h, d // h, qkv_bias=cfg.enable_bias, out_bias=cfg.enable_bias,
                                             out_name="out_proj", dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # fmt: skip
        self.self_attn_layer_norm = _ln(d, cfg.layer_norm_eps, dtype, param_dtype, rngs)
        self.fc1 = nnx.Linear(d, cfg.ffn_dim, use_bias=cfg.enable_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.ffn_dim, d, use_bias=cfg.enable_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.final_layer_norm = _ln(d, cfg.layer_norm_eps, dtype, param_dtype, rngs)
        self.act = _activation(cfg.activation_function)

    def __call__(self, x, positions, mask=None):
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        x = x + self.self_attn(h, positions, None, mask)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_ln else x
        x = x + self.fc2(self.act(self.fc1(h)))
        return x if self.pre_ln else self.final_layer_norm(x)


class OPTForCausalLM(KVCacheDecoder, nnx.Module):
    """OPT: learned positions (offset 2), ReLU MLP, tied LM head; optional project_in/out (OPT-350m)."""

    def __init__(self, cfg: OPTConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        e = cfg.word_embed_proj_dim or cfg.hidden_size
        self.embed_tokens = nnx.Embed(cfg.vocab_size, e, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_positions = nnx.Embed(cfg.max_position_embeddings + 2, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.project_in = nnx.data(None)
        self.project_out = nnx.data(None)
        if e != cfg.hidden_size:
            self.project_in = nnx.Linear(e, cfg.hidden_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.project_out = nnx.Linear(cfg.hidden_size, e, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([OPTLayer(cfg, dtype, param_dtype, rngs) for _ in range(cfg.num_hidden_layers)])
        self.final_layer_norm = nnx.data(None)
        if cfg.do_layer_norm_before:
            self.final_layer_norm = _ln(cfg.hidden_size, cfg.layer_norm_eps, dtype, param_dtype, rngs)

    def __call__(self, ids, positions=None, mask=None):
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        x = self.embed_tokens(ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + 2)
        for layer in self.layers:
            x = layer(x, positions, mask)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return self.embed_tokens.attend(x)


def opt_name(hf: str):
    name = hf.removeprefix("model.").removeprefix("decoder.")
    if name == "lm_head.weight":
        return None  # tied to embed_tokens
    m = re.fullmatch(r"(.+)\.(weight|bias)", name)
    mod, kind = m.group(1).split("."), m.group(2)
    is_ln = mod[-1].endswith("layer_norm")
    is_embed = mod[-1].startswith("embed_")
    leaf = ("scale" if kind == "weight" else "bias") if is_ln else ("embedding" if is_embed else ("kernel" if kind == "weight" else "bias"))
    path = tuple(int(p) if p.isdigit() else p for p in mod) + (leaf,)
    return path, (kind == "weight" and not is_ln and not is_embed)


# ---- GPT-2 ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GPT2Config(_FromHF):
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int = 1024
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"



class GPT2Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, dtype, param_dtype, rngs):
        d = cfg.n_embd
        self.heads = cfg.n_head
        self.c_attn = nnx.Linear(d, 3 * d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_proj = nnx.Linear(d, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = AttentionOp()

    def __call__(self, x, mask=None):
        b, t, d = x.shape
        q, k, v = (a.reshape(b, t, self.heads, d // self.heads) for a in jnp.split(self.c_attn(x), 3, axis=-1))
        return self.c_proj(self.attn(q, k, v, mask=mask, causal=True).reshape(b, t, d))


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, dtype, param_dtype, rngs):
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.c_fc = nnx.Linear(cfg.n_embd, inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_proj = nnx.Linear(inner, cfg.n_embd, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = _activation(cfg.activation_function)

    def __call__(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nnx.Module):
    def __init__(self, cfg, dtype, param_dtype, rngs):
        self.ln_1 = _ln(cfg.n_embd, cfg.layer_norm_epsilon, dtype, param_dtype, rngs)
        self.attn = GPT2Attention(cfg, dtype, param_dtype, rngs)
        self.ln_2 = _ln(cfg.n_embd, cfg.layer_norm_epsilon, dtype, param_dtype, rngs)
        self.mlp = GPT2MLP(cfg, dtype, param_dtype, rngs)

    def __call__(self, x, mask=None):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(nnx.Module):
    """GPT-2: learned positions, pre-LN blocks, fused c_attn, tied LM head (no KV cache)."""

    def __init__(self, cfg: GPT2Config, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wpe = nnx.Embed(cfg.n_positions, cfg.n_embd, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.h = nnx.List([GPT2Block(cfg, dtype, param_dtype, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = _ln(cfg.n_embd, cfg.layer_norm_epsilon, dtype, param_dtype, rngs)

    def __call__(self, ids, positions=None, mask=None):
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        x = self.wte(ids) + self.wpe(positions)
        for block in self.h:
            x = block(x, mask)
        return self.wte.attend(self.ln_f(x))


def gpt2_name(hf: str):
    name = hf.removeprefix("transformer.")
    if name == "lm_head.weight" or name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
        return None
    if name in ("wte.weight", "wpe.weight"):
        return (name.split(".")[0], "embedding"), False
    m = re.fullmatch(r"(.+)\.(weight|bias)", name)
    mod, kind = m.group(1).split("."), m.group(2)
    is_ln = mod[-1].startswith("ln_")
    leaf = ("scale" if kind == "weight" else "bias") if is_ln else ("kernel" if kind == "weight" else "bias")
    return tuple(int(p) if p.isdigit() else p for p in mod) + (leaf,), False  # Conv1D weights are already (in, out)


# ---- BERT ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BertConfig(_FromHF):
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"



class _Dense(nnx.Module):
    """HF's `*.dense` (+ optional LayerNorm) sub-blocks, named as in the checkpoint."""

    def __init__(self, i, o, ln_eps, dtype, param_dtype, rngs):
        self.dense = nnx.Linear(i, o, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.LayerNorm = nnx.data(None) if ln_eps is None else _ln(o, ln_eps, dtype, param_dtype, rngs)


class BertSelfAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, dtype, param_dtype, rngs):
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.query = nnx.Linear(d, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.key = nnx.Linear(d, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.value = nnx.Linear(d, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = AttentionOp()

    def __call__(self, x, mask):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        return self.attn(split(self.query(x)), split(self.key(x)), split(self.value(x)), mask=mask).reshape(b, t, d)


class BertAttention(nnx.Module):
    def __init__(self, cfg, dtype, param_dtype, rngs):
        self.self = BertSelfAttention(cfg, dtype, param_dtype, rngs)
        self.output = _Dense(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps, dtype, param_dtype, rngs)


class BertLayer(nnx.Module):
    def __init__(self, cfg, dtype, param_dtype, rngs):
        self.attention = BertAttention(cfg, dtype, param_dtype, rngs)
        self.intermediate = _Dense(cfg.hidden_size, cfg.intermediate_size, None, dtype, param_dtype, rngs)
        self.output = _Dense(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, dtype, param_dtype, rngs)
        self.act = _activation(cfg.hidden_act)

    def __call__(self, x, mask):
        a = self.attention.output
        x = a.LayerNorm(x + a.dense(self.attention.self(x, mask)))
        return self.output.LayerNorm(x + self.output.dense(self.act(self.intermediate.dense(x))))


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, **kw)
        self.LayerNorm = _ln(cfg.hidden_size, cfg.layer_norm_eps, dtype, param_dtype, rngs)


class BertEncoder(nnx.Module):
    def __init__(self, cfg, dtype, param_dtype, rngs):
        self.layer = nnx.List([BertLayer(cfg, dtype, param_dtype, rngs) for _ in range(cfg.num_hidden_layers)])


class BertModel(nnx.Module):
    """BERT encoder: `model(ids, attention_mask)` → last hidden states; `embed(...)` → mean-pooled vectors."""

    def __init__(self, cfg: BertConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg, dtype, param_dtype, rngs)
        self.encoder = BertEncoder(cfg, dtype, param_dtype, rngs)

    def __call__(self, ids, attention_mask=None, token_type_ids=None):
        b, t = ids.shape
        e = self.embeddings
        tt = jnp.zeros_like(ids) if token_type_ids is None else token_type_ids
        x = e.word_embeddings(ids) + e.position_embeddings(jnp.arange(t)[None]) + e.token_type_embeddings(tt)
        x = e.LayerNorm(x)
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    def embed(self, ids, attention_mask=None, normalize: bool = True):
        """Mean pooling over non-padding tokens (sentence-transformers style), optionally L2-normalised."""
        h = self(ids, attention_mask)
        w = jnp.ones(ids.shape, h.dtype) if attention_mask is None else attention_mask.astype(h.dtype)
        pooled = jnp.sum(h * w[..., None], axis=1) / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-9)
        return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True) if normalize else pooled


def bert_name(hf: str):
    name = hf.removeprefix("bert.")
    if name.startswith(("pooler.", "cls.")) or name.endswith("position_ids"):
        return None
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    m = re.fullmatch(r"(.+)\.(weight|bias)", name)
    mod, kind = m.group(1).split("."), m.group(2)
    if mod[-1].endswith("_embeddings"):
        return tuple(mod) + ("embedding",), False
    is_ln = mod[-1] == "LayerNorm"
    leaf = ("scale" if kind == "weight" else "bias") if is_ln else ("kernel" if kind == "weight" else "bias")
    return tuple(int(p) if p.isdigit() else p for p in mod) + (leaf,), (kind == "weight" and not is_ln)


def _activation(name: str):
    acts = {
        "relu": jax.nn.relu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "silu": jax.nn.silu,
    }
    if name not in acts:
        raise NotImplementedError(f"activation {name!r} is not supported; known: {sorted(acts)}")
    return acts[name]

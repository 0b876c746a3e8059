"""Structure maps: which op feeds which linears in each model family, and layer-by-layer execution.

Methods that fold a function-preserving transform into a model (SmoothQuant, OS+, AWQ, rotations) need
to know, per layer, which producer (a norm, or a linear) feeds which consumer linears; sequential
methods (GPTQ, DuQuant) need to run a model one layer at a time so that layer i+1 sees the outputs of
the already-transformed layer i. A `FamilyMap` answers both without model-specific code in the methods.
Paths are relative to a layer (`self_attn.q_proj`) or to the model (`layers.3.self_attn.q_proj`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax.models.classic import GPT2LMHeadModel, OPTForCausalLM
from qjax.models.common import rope_frequencies
from qjax.models.llama import LlamaForCausalLM


@dataclasses.dataclass(frozen=True)
class Group:
    """`producer`'s output (channels [offset, offset + width) of it) is the whole input of `consumers`.

    A per-channel scale or shift of that output can be folded into the producer and undone in the
    consumers' kernels. `repeat`/`head_dim` describe grouped-query attention, where consumer channel
    (h·head_dim + d) reads producer channel ((h // repeat)·head_dim + d).
    """

    producer: str
    consumers: tuple[str, ...]
    kind: str  # "rmsnorm" | "layernorm" | "linear"
    offset: int = 0
    repeat: int = 1
    head_dim: int = 0

    def consumer_index(self, width: int) -> np.ndarray:
        """For each consumer input channel, the producer channel (relative to `offset`) it reads."""
        c = np.arange(width)
        if self.repeat == 1:
            return c
        h, d = np.divmod(c, self.head_dim)
        return (h // self.repeat) * self.head_dim + d


@dataclasses.dataclass(frozen=True)
class FamilyMap:
    """What the methods need to know about one model family."""

    name: str
    layers_attr: str
    norm_kind: str  # "rmsnorm" or "layernorm"
    groups: Callable[[Any], tuple[Group, ...]]  # model -> groups of every layer (relative paths)
    linears: tuple[str, ...]  # every linear of a layer, in execution order
    embed: Callable[[Any, jax.Array], tuple[jax.Array, tuple]]  # (model, ids) -> (hidden, aux)
    call_layer: Callable[[Any, jax.Array, tuple], jax.Array]  # (layer, hidden, aux) -> hidden
    head: Callable[[Any, jax.Array], jax.Array]  # (model, hidden) -> logits
    residual_writers: tuple[str, ...] = ()  # linears whose outputs are added to the residual stream
    final_norm: str | None = None

    def layers(self, model) -> list:
        layers = getattr(model, self.layers_attr)
        if getattr(model.config, "scan_layers", False):
            raise ValueError(f"{self.name}: this model has stacked (scan_layers) layers; call unstack_layers(model) first")
        return list(layers)

    def layer_path(self, i: int, rel: str = "") -> str:
        return f"{self.layers_attr}.{i}" + (f".{rel}" if rel else "")

    def forward(self, model, ids: jax.Array) -> jax.Array:
        """The model's forward pass, layer by layer (equal to `model(ids)`; tested)."""
        x, aux = self.embed(model, ids)
        for layer in self.layers(model):
            x = self.call_layer(layer, x, aux)
        return self.head(model, x)


# ---- Llama family ---------------------------------------------------------------------------------------


def _llama_groups(model: LlamaForCausalLM) -> tuple[Group, ...]:
    cfg = model.config
    return (
        Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "rmsnorm"),
        Group("self_attn.v_proj", ("self_attn.o_proj",), "linear", repeat=cfg.num_attention_heads // cfg.kv_heads,
              head_dim=cfg.dim_per_head),  # fmt: skip
        Group("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "rmsnorm"),
        Group("mlp.up_proj", ("mlp.down_proj",), "linear"),  # silu(gate)·up is linear in up's output channels
    )


def _llama_embed(model: LlamaForCausalLM, ids):
    cfg = model.config
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return model.embed_tokens(ids), (positions, rope_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling))


def _llama_head(model: LlamaForCausalLM, x):
    x = model.norm(x)
    return model.embed_tokens.attend(x) if model.lm_head is None else model.lm_head(x)


LLAMA = FamilyMap(
    "llama", "layers", "rmsnorm", _llama_groups,
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    _llama_embed, lambda layer, x, aux: layer(x, aux[0], aux[1]), _llama_head,
    residual_writers=("self_attn.o_proj", "mlp.down_proj"), final_norm="norm",
)  # fmt: skip


# ---- OPT ------------------------------------------------------------------------------------------------


def _opt_groups(model: OPTForCausalLM) -> tuple[Group, ...]:
    v_to_out = Group("self_attn.v_proj", ("self_attn.out_proj",), "linear")
    if not model.config.do_layer_norm_before:  # post-LN (OPT-350m): the norms do not feed the linears
        return (v_to_out,)
    return (
        Group("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "layernorm"),
        v_to_out,
        Group("final_layer_norm", ("fc1",), "layernorm"),
    )


def _opt_embed(model: OPTForCausalLM, ids):
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    x = model.embed_tokens(ids)
    if model.project_in is not None:
        x = model.project_in(x)
    return x + model.embed_positions(positions + 2), (positions,)


def _opt_head(model: OPTForCausalLM, x):
    if model.final_layer_norm is not None:
        x = model.final_layer_norm(x)
    if model.project_out is not None:
        x = model.project_out(x)
    return model.embed_tokens.attend(x)


OPT = FamilyMap(
    "opt", "layers", "layernorm", _opt_groups,
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    _opt_embed, lambda layer, x, aux: layer(x, aux[0]), _opt_head,
    residual_writers=("self_attn.out_proj", "fc2"), final_norm="final_layer_norm",
)  # fmt: skip


# ---- GPT-2 ----------------------------------------------------------------------------------------------


def _gpt2_groups(model: GPT2LMHeadModel) -> tuple[Group, ...]:
    d = model.config.n_embd
    return (
        Group("ln_1", ("attn.c_attn",), "layernorm"),
        Group("attn.c_attn", ("attn.c_proj",), "linear", offset=2 * d),  # the V third of the fused projection
        Group("ln_2", ("mlp.c_fc",), "layernorm"),
    )


def _gpt2_embed(model: GPT2LMHeadModel, ids):
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return model.wte(ids) + model.wpe(positions), ()


GPT2 = FamilyMap(
    "gpt2", "h", "layernorm", _gpt2_groups, ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    _gpt2_embed, lambda layer, x, aux: layer(x), lambda model, x: model.wte.attend(model.ln_f(x)),
    residual_writers=("attn.c_proj", "mlp.c_proj"), final_norm="ln_f",
)  # fmt: skip

FAMILIES: dict[type, FamilyMap] = {LlamaForCausalLM: LLAMA, OPTForCausalLM: OPT, GPT2LMHeadModel: GPT2}


def family_of(model, step: str = "this step") -> FamilyMap:
    """The structure map of `model`'s family; a clear error naming the step for a family it cannot handle."""
    fam = FAMILIES.get(type(model))
    if fam is None:
        known = ", ".join(f.name for f in FAMILIES.values())
        raise ValueError(f"{step} needs a model with a structure map ({known}); got {type(model).__name__}")
    return fam


# ---- module access and folding ------------------------------------------------------------------------------


def get_module(root, path: str):
    """The submodule at a dotted path (`self_attn.q_proj`, `layers.3.mlp`)."""
    node = root
    for key in path.split(".") if path else ():
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    return node


def _float_kernel(module, path: str):
    value = module.kernel.get_value()
    if not isinstance(value, jax.Array | np.ndarray):
        raise ValueError(f"{path}: the weight is already packed; fold transforms into the float model before quantizing")
    return value


def _producer_vars(layer, group: Group) -> list:
    """The producer's variables that scale with its output channels: norm scale/bias, or kernel columns/bias."""
    mod = get_module(layer, group.producer)
    if group.kind == "linear":
        _float_kernel(mod, group.producer)
        return [v for v in (mod.kernel, mod.bias) if v is not None]
    return [v for v in (getattr(mod, "scale", None), getattr(mod, "bias", None)) if v is not None]


def _update_output_channels(var, group: Group, width: int, fn) -> None:
    """Apply `fn` to channels [offset, offset + width) of a variable's last axis."""
    value = var.get_value()
    lo, hi = group.offset, group.offset + width
    part = fn(value[..., lo:hi].astype(jnp.float32)).astype(value.dtype)
    var.set_value(value.at[..., lo:hi].set(part))


def group_width(layer, group: Group) -> int:
    """Number of producer channels the group's consumers read."""
    consumer = get_module(layer, group.consumers[0])
    rows = _float_kernel(consumer, group.consumers[0]).shape[0]
    return int(group.consumer_index(rows).max()) + 1


def fold_scale(layer, group: Group, s: jax.Array) -> None:
    """Divide the producer's output channels by `s` and multiply the consumers' input rows by it.

    Exact in float: consumer(producer(x) / s) with rows·s equals the original. `s` has the group's width.
    """
    s = jnp.asarray(s, jnp.float32)
    for var in _producer_vars(layer, group):
        _update_output_channels(var, group, s.shape[0], lambda v: v / s)
    for path in group.consumers:
        mod = get_module(layer, path)
        k = _float_kernel(mod, path)
        rows = s[group.consumer_index(k.shape[0])]
        mod.kernel.set_value((k.astype(jnp.float32) * rows[:, None]).astype(k.dtype))


def fold_shift(layer, group: Group, z: jax.Array) -> None:
    """Subtract `z` from the producer's output channels and add z·W to the consumers' biases (OS+ shift).

    Needs a producer bias (LayerNorm, or a linear with bias) and consumer biases.
    """
    z = jnp.asarray(z, jnp.float32)
    prod = get_module(layer, group.producer)
    bias = getattr(prod, "bias", None)
    if bias is None:
        raise ValueError(f"{group.producer} has no bias to absorb a channel shift ({type(prod).__name__})")
    for path in group.consumers:
        mod = get_module(layer, path)
        if mod.bias is None:
            raise ValueError(f"{path} has no bias to absorb a channel shift")
    _update_output_channels(bias, group, z.shape[0], lambda v: v - z)
    for path in group.consumers:
        mod = get_module(layer, path)
        k = _float_kernel(mod, path).astype(jnp.float32)
        zc = z[group.consumer_index(k.shape[0])]
        b = mod.bias.get_value()
        mod.bias.set_value((b.astype(jnp.float32) + zc @ k).astype(b.dtype))


def can_shift(layer, group: Group) -> bool:
    """Whether `fold_shift` applies (producer and every consumer have a bias)."""
    if getattr(get_module(layer, group.producer), "bias", None) is None:
        return False
    return all(get_module(layer, p).bias is not None for p in group.consumers)


# ---- stacked (scan_layers) models ------------------------------------------------------------------------------


def unstack_layers(model):
    """A Llama-family model with `scan_layers=True` as the equivalent per-layer model (a new object).

    Methods that work layer by layer (and per-layer rules) address `layers.i.…`; the float parameters are
    sliced from the stacked ones, so the function is unchanged.
    """
    if not getattr(model.config, "scan_layers", False):
        return model
    cfg = dataclasses.replace(model.config, scan_layers=False)
    n = cfg.num_hidden_layers
    stacked = dict(nnx.to_flat_state(nnx.state(model)))
    if any(not isinstance(v, nnx.Param) for v in stacked.values()):
        raise ValueError("unstack_layers needs a float model (quantize after unstacking)")
    dtype = model.embed_tokens.dtype
    abstract = nnx.eval_shape(lambda: type(model)(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        if path[0] == "layers":
            var.set_value(stacked[("layers",) + path[2:]].get_value()[path[1]])
        else:
            var.set_value(stacked[path].get_value())
    return nnx.merge(graphdef, state)

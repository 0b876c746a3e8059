"""QuaRot-style rotation (Ashkboos et al. 2024): fold the RMSNorm gains, rotate the residual stream by an
orthogonal Q, and put online Hadamards where nothing can absorb them (before down_proj, per head before o_proj).

With every norm gain folded into the linears it feeds (γ = 1), RMSNorm(x Q) = RMSNorm(x) Q, so rotating the
embedding (E Q), the residual readers (Qᵀ W) and the residual writers (W Q, b Q) leaves the function unchanged
while a massive outlier channel is spread over all channels. LayerNorm families are refused: mean-centering
does not commute with a rotation.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax.experiments.pipeline import Context, register
from qjax.models.structure import family_of, get_module, unstack_layers
from qjax.numerics import QArray
from qjax.numerics.linear_maps import Rotation, fold_into_kernel, fold_into_output
from qjax.numerics.rotation import hadamard_matrix, hadamard_rotation, random_hadamard, random_orthogonal
from qjax.transforms import float_op
from qjax.transforms.nnx_modules import set_child

KINDS = ("hadamard", "orthogonal")


@dataclasses.dataclass
class RotateConfig:
    """kind: residual rotation, "hadamard" (randomized Hadamard) or "orthogonal" (Haar random).
    residual: rotate the residual stream (norms are folded either way).
    online_down_proj: an online Hadamard of the MLP width before every down_proj.
    online_o_proj: an online Hadamard per head (block-diagonal over the heads) before every o_proj.
    online_qk: a Hadamard over head_dim applied to q and k after RoPE (for quantized q/k/KV cache).
    untie_head: give a tied-embedding model its own lm_head (costs vocab × d extra parameters)."""

    kind: str = "hadamard"
    residual: bool = True
    online_down_proj: bool = True
    online_o_proj: bool = False
    online_qk: bool = False
    untie_head: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"rotate: kind must be one of {KINDS}, got {self.kind!r}")


def check(model, cfg: RotateConfig) -> None:
    """Only RMSNorm (Llama-family) models; a tied head needs untie_head unless the final norm gain is 1."""
    fam = family_of(model, "rotate")
    if fam.norm_kind != "rmsnorm":
        raise ValueError(f"rotate: the {fam.name} family uses LayerNorm, and mean-centering does not commute with a "
                         f"rotation; rotate supports RMSNorm (Llama-family) models only")  # fmt: skip
    if model.lm_head is None and not cfg.untie_head and not bool(jnp.all(model.norm.scale.get_value() == 1)):
        raise ValueError("rotate: tied embeddings with untie_head=False cannot absorb the final norm gain; set untie_head=True")


def _kernel(module, path: str) -> jnp.ndarray:
    """The float kernel in float32; packed weights cannot be rotated."""
    value = module.kernel.get_value()
    if isinstance(value, QArray):
        raise ValueError(f"rotate: {path} is already quantized; rotate the float model before quantizing")
    return value.astype(jnp.float32)


def _set(var, value) -> None:
    var.set_value(value.astype(var.get_value().dtype))


def untie(model) -> None:
    """Give a tied model an lm_head holding embeddingᵀ (the head will differ from the rotated table)."""
    emb = model.embed_tokens
    table = emb.embedding.get_value()
    vocab, d = table.shape
    head = nnx.Linear(d, vocab, use_bias=False, dtype=emb.dtype, param_dtype=table.dtype, rngs=nnx.Rngs(0))
    head.kernel.set_value(table.T)
    model.lm_head = head
    model.config = dataclasses.replace(model.config, tie_word_embeddings=False)


def fold_norm(norm, linears: list, paths: list[str]) -> None:
    """Fold an RMSNorm gain γ into the linears it feeds (kernel rows *= γ) and set γ := 1."""
    gamma = norm.scale.get_value().astype(jnp.float32)
    for lin, path in zip(linears, paths, strict=True):
        _set(lin.kernel, _kernel(lin, path) * gamma[:, None])
    _set(norm.scale, jnp.ones_like(gamma))


def residual_rotation(key, d: int, kind: str):
    """The d × d orthogonal map Q of the residual stream."""
    return random_hadamard(key, d) if kind == "hadamard" else Rotation(random_orthogonal(key, d)[None])


def head_hadamard(heads: int, head_dim: int) -> Rotation:
    """diag(H, …, H) over the heads, H the normalized Hadamard matrix of size head_dim."""
    h = jnp.asarray(hadamard_matrix(head_dim) / np.sqrt(head_dim), jnp.float32)
    return Rotation(jnp.broadcast_to(h, (heads, head_dim, head_dim)))


def attach_online(layer, rel: str, path: str, m) -> None:
    """Replace the linear at `rel` by a float op with input transform `m` (its kernel absorbs m⁻¹)."""
    op = float_op(get_module(layer, rel), path)
    set_child(layer, tuple(rel.split(".")), op)
    op.add_input_transform(m)


def rotate_residual(model, fam, q) -> None:
    """E ← E Q; residual readers W ← Qᵀ W; residual writers W ← W Q, b ← b Q (norm gains already 1)."""
    emb = model.embed_tokens.embedding
    _set(emb, q.apply(emb.get_value().astype(jnp.float32)))
    readers = [c for g in fam.groups(model) if g.kind == "rmsnorm" for c in g.consumers]
    for i, layer in enumerate(fam.layers(model)):
        for rel in readers:
            _fold_reader(get_module(layer, rel), fam.layer_path(i, rel), q)
        for rel in fam.residual_writers:
            mod, path = get_module(layer, rel), fam.layer_path(i, rel)
            bias = None if mod.bias is None else mod.bias.get_value().astype(jnp.float32)
            kernel, bias = fold_into_output(q, _kernel(mod, path), bias)
            _set(mod.kernel, kernel)
            if bias is not None:
                _set(mod.bias, bias)
    if model.lm_head is not None:
        _fold_reader(model.lm_head, "lm_head", q)


def _fold_reader(mod, path: str, q) -> None:
    if getattr(mod, "input_transform", None) is not None:
        raise ValueError(f"rotate: {path} already has an online input transform; rotate before other transforms")
    _set(mod.kernel, fold_into_kernel(q, _kernel(mod, path)))


@register("rotate", RotateConfig, check=check)
def rotate(model, cfg: RotateConfig, ctx: Context):
    """Fold norms, rotate the residual stream, attach online Hadamards. On a tied-embedding model the head is
    untied first (`untie_head`): the model then stores vocab × d more parameters."""
    check(model, cfg)
    model = unstack_layers(model)
    fam = family_of(model, "rotate")
    if model.lm_head is None and cfg.untie_head:
        untie(model)
    layers = fam.layers(model)
    for i, layer in enumerate(layers):
        for g in (g for g in fam.groups(model) if g.kind == "rmsnorm"):
            fold_norm(get_module(layer, g.producer), [get_module(layer, c) for c in g.consumers],
                      [fam.layer_path(i, c) for c in g.consumers])  # fmt: skip
    if model.lm_head is not None:
        fold_norm(model.norm, [model.lm_head], ["lm_head"])
    if cfg.residual:
        rotate_residual(model, fam, residual_rotation(ctx.key, model.config.hidden_size, cfg.kind))
    c = model.config
    for i, layer in enumerate(layers):
        if cfg.online_down_proj:
            attach_online(layer, "mlp.down_proj", fam.layer_path(i, "mlp.down_proj"), hadamard_rotation(c.intermediate_size))
        if cfg.online_o_proj:
            attach_online(layer, "self_attn.o_proj", fam.layer_path(i, "self_attn.o_proj"),
                          head_hadamard(c.num_attention_heads, c.dim_per_head))  # fmt: skip
        if cfg.online_qk:
            layer.self_attn.attn.set_qk_transform(hadamard_rotation(c.dim_per_head))
    return model

"""Load Hugging Face checkpoints (config.json + safetensors, sharded or not) into qjax's NNX models.

`load_pretrained(path_or_hub_id)` reads a local directory, or downloads a hub id with huggingface_hub
(the real hub code; these machines can only test local directories). The model is built abstractly
(`nnx.eval_shape`), and every tensor is placed straight from host memory, optionally with a sharding
per parameter, so no device ever holds the whole float model first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax.models.classic import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    OPTConfig,
    OPTForCausalLM,
    bert_name,
    gpt2_name,
    opt_name,
)
from qjax.models.llama import LlamaConfig, LlamaForCausalLM

ShardingFn = Callable[[str, tuple[int, ...]], jax.sharding.Sharding | None]

LLAMA_TYPES = ("llama", "mistral", "qwen2")


def llama_name(hf: str) -> tuple[tuple, bool] | None:
    """HF tensor name -> (qjax state path, transpose?) for the Llama family; None for tensors to ignore."""
    if hf.endswith("rotary_emb.inv_freq"):
        return None
    name = hf.removeprefix("model.")
    if name == "embed_tokens.weight":
        return ("embed_tokens", "embedding"), False
    if name == "norm.weight":
        return ("norm", "scale"), False
    if name == "lm_head.weight":
        return ("lm_head", "kernel"), True
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m is None:
        raise KeyError(hf)
    layer, mod, kind = int(m.group(1)), m.group(2).split("."), m.group(3)
    if mod[-1].endswith("layernorm"):
        return ("layers", layer, *mod, "scale"), False
    return ("layers", layer, *mod, "kernel" if kind == "weight" else "bias"), kind == "weight"


# HF model_type -> (config class, model class, HF tensor name -> (qjax path, transpose?) | None)
FAMILIES: dict[str, tuple] = {
    **{t: (LlamaConfig, LlamaForCausalLM, llama_name) for t in LLAMA_TYPES},
    "opt": (OPTConfig, OPTForCausalLM, opt_name),
    "gpt2": (GPT2Config, GPT2LMHeadModel, gpt2_name),
    "bert": (BertConfig, BertModel, bert_name),
}


def resolve_checkpoint(path_or_id: str | os.PathLike) -> str:
    """A local directory as is; otherwise a hub id downloaded (config, tokenizer, safetensors) by huggingface_hub."""
    path = os.fspath(path_or_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; pass the checkpoint directory (config.json + *.safetensors)")
    if os.sep in path.strip("/") and path.count("/") > 1 or path.startswith((".", "/")):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    from huggingface_hub import snapshot_download  # lazily: only for hub ids

    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as numpy arrays (bf16 via ml_dtypes), following the shard index."""
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    tensors = {}
    for fname in files:
        path = os.path.join(directory, fname)
        if not os.path.exists(path):
            raise FileNotFoundError(f"shard {fname} listed in the index is missing from {directory}")
        with safe_open(path, framework="numpy") as f:  # host memory only; devices get tensors in fill_state
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    return tensors


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json in {directory}")
    with open(path) as f:
        return json.load(f)


def build(config: dict, *, dtype=None, param_dtype=jnp.float32, **options):
    """(model built abstractly, config object, name mapper) for an HF config dict; `options` override
    config fields (e.g. scan_layers=True for the Llama family)."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"unknown architecture model_type={model_type!r}; supported: {sorted(FAMILIES)}")
    cfg_cls, model_cls, mapper = FAMILIES[model_type]
    cfg = cfg_cls.from_hf(config)
    if options:
        unknown = set(options) - {f.name for f in dataclasses.fields(cfg)}
        if unknown:
            raise ValueError(f"{model_type} models have no option(s) {sorted(unknown)}")
        cfg = dataclasses.replace(cfg, **options)
    abstract = nnx.eval_shape(lambda: model_cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    return abstract, cfg, mapper


def fill_state(abstract: nnx.Module, tensors: dict[str, np.ndarray], mapper, *, param_dtype=jnp.float32,
               sharding_fn: ShardingFn | None = None, source: str = "checkpoint") -> nnx.Module:  # fmt: skip
    """Put checkpoint tensors into an abstract model; every parameter must be covered with the right shape."""
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    filled = set()
    stacks: dict[tuple, dict[int, np.ndarray]] = {}  # scanned layers: path without the index → {layer: tensor}
    for name, array in tensors.items():
        mapped = mapper(name)
        if mapped is None:
            continue
        path, transpose = mapped
        value = array.T if transpose else array
        if path not in flat and len(path) > 1 and isinstance(path[1], int) and (path[:1] + path[2:]) in flat:
            stacks.setdefault(path[:1] + path[2:], {})[path[1]] = value
            continue
        if path not in flat:
            raise ValueError(f"{source}: tensor {name!r} has no place in the model (config and weights disagree)")
        _place(flat, path, value, name, transpose, param_dtype, sharding_fn, source)
        filled.add(path)
    for path, layers in stacks.items():
        n = flat[path].get_value().shape[0]
        if sorted(layers) != list(range(n)):
            raise ValueError(f"{source}: stacked parameter {'.'.join(map(str, path))} needs layers 0..{n - 1}, got {sorted(layers)}")
        _place(flat, path, np.stack([layers[i] for i in range(n)]), ".".join(map(str, path)), False, param_dtype, sharding_fn, source)
        filled.add(path)
    missing = [".".join(map(str, p)) for p, v in flat.items() if isinstance(v, nnx.Param) and p not in filled]
    if missing:
        raise ValueError(f"{source}: no tensor for parameter(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for path, var in flat.items():  # non-parameter state (rope tables, caches) is computed, not loaded
        if path not in filled and isinstance(var.get_value(), jax.ShapeDtypeStruct):
            raise ValueError(f"{source}: state {path} is neither loaded nor computable")
    return nnx.merge(graphdef, state)


def _place(flat, path, value, name, transpose, param_dtype, sharding_fn, source) -> None:
    """Check one tensor's shape against the abstract parameter and put it on its device(s)."""
    var = flat[path]
    if tuple(value.shape) != tuple(var.get_value().shape):
        raise ValueError(f"{source}: tensor {name!r} has shape {tuple(value.shape)}{' (transposed)' if transpose else ''}, "
                         f"the config implies {tuple(var.get_value().shape)}")  # fmt: skip
    value = np.asarray(value, dtype=param_dtype)
    sharding = sharding_fn(".".join(map(str, path)), value.shape) if sharding_fn else None
    var.set_value(jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value))


def load_pretrained(path_or_id: str | os.PathLike, *, dtype=None, param_dtype=jnp.float32,
                    sharding_fn: ShardingFn | None = None, **options):  # fmt: skip
    """(model, config) from a Hugging Face checkpoint directory or hub id; `options` override config
    fields (`scan_layers=True` stacks Llama-family layers for nnx.scan)."""
    directory = resolve_checkpoint(path_or_id)
    config = read_config(directory)
    abstract, cfg, mapper = build(config, dtype=dtype, param_dtype=param_dtype, **options)
    tensors = read_safetensors(directory)
    if cfg_tied(config) and "lm_head.weight" in tensors:
        tensors.pop("lm_head.weight")  # tied: the head is the embedding
    return fill_state(abstract, tensors, mapper, param_dtype=param_dtype, sharding_fn=sharding_fn, source=directory), cfg


def cfg_tied(config: dict) -> bool:
    return bool(config.get("tie_word_embeddings", False))

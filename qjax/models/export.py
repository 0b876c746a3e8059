"""Write qjax Llama-family models as Hugging Face checkpoints (config.json + model.safetensors)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax.models.llama import LlamaConfig, LlamaForCausalLM


def llama_hf_name(path: tuple) -> tuple[str, bool]:
    """qjax state path → (HF tensor name, transpose?) — the inverse of `hf.llama_name`."""
    *mod, leaf = [str(p) for p in path]
    if mod == ["lm_head"]:
        return "lm_head.weight", True
    name = "model." + ".".join(mod)
    if leaf == "embedding":
        return name + ".weight", False
    if leaf == "scale":
        return name + ".weight", False
    return name + (".weight" if leaf == "kernel" else ".bias"), leaf == "kernel"


def save_llama(model: LlamaForCausalLM, directory: str, dtype=jnp.bfloat16) -> None:
    """Save as an HF Llama checkpoint that transformers and `qjax.models.load_pretrained` both read."""
    from safetensors.numpy import save_file

    cfg: LlamaConfig = model.config
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = llama_hf_name(path)
        value = np.asarray(jnp.asarray(var.get_value(), dtype))
        tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    tmp = os.path.join(directory, "model.safetensors.tmp")
    save_file(tensors, tmp)
    os.replace(tmp, os.path.join(directory, "model.safetensors"))
    hf = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "rope_scaling"}
    hf.update(model_type="llama", architectures=["LlamaForCausalLM"], torch_dtype=jnp.dtype(dtype).name)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)

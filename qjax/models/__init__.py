"""qjax.models: Flax NNX model families and Hugging Face / GGUF checkpoint loading."""

from qjax.models.classic import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM
from qjax.models.common import generate
from qjax.models.hf import load_pretrained
from qjax.models.llama import LlamaConfig, LlamaForCausalLM

__all__ = ["BertConfig", "BertModel", "GPT2Config", "GPT2LMHeadModel", "OPTConfig", "OPTForCausalLM", "LlamaConfig", "LlamaForCausalLM", "generate", "load_pretrained"]

"""Tokenizers: byte-level (the embedded model's), tokenizer.json / HF directories, and GGUF metadata."""

from __future__ import annotations

import os

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256): exact, dependency-free, used by the embedded default model."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` with numpy encode/decode."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text).ids, np.int32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def load_tokenizer(path: str):
    """'bytes', a tokenizer.json file, or a directory holding one (HF layout)."""
    if path == "bytes":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    tok = Tokenizer.from_file(file)
    tok.no_padding()  # e.g. all-MiniLM's tokenizer.json pads to 128
    tok.no_truncation()
    return HFTokenizer(tok)


def tokenizer_from_gguf(reader) -> HFTokenizer:
    """Rebuild a GPT-2-style byte-level BPE tokenizer from GGUF metadata (tokens + merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    def field(name):
        f = reader.fields[name]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    if bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() != "gpt2":
        raise NotImplementedError("only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    tokens = field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = []
    if "tokenizer.ggml.pre" in reader.fields and bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode() == "smollm":
        pre.append(pre_tokenizers.Digits(individual_digits=True))
    pre.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    return HFTokenizer(tok)

"""Corpora and token windows: the embedded Austen corpus, Hugging Face datasets, local text files."""

from __future__ import annotations

import gzip
import os
from importlib import resources

import jax
import numpy as np

AUSTEN_TRAIN = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey")
AUSTEN_HELDOUT = ("persuasion",)


def austen(split: str = "train") -> str:
    """The embedded public-domain corpus (built by scripts/extract_austen.py): five novels for
    training/calibration, Persuasion held out for evaluation."""
    names = {"train": AUSTEN_TRAIN, "test": AUSTEN_HELDOUT, "validation": AUSTEN_HELDOUT}.get(split)
    if names is None:
        raise ValueError(f"unknown split {split!r} for the Austen corpus; use 'train' or 'test'")
    root = resources.files("qjax.data") / "corpus"
    texts = []
    for name in names:
        with (root / f"austen_{name}.txt.gz").open("rb") as f:
            texts.append(gzip.decompress(f.read()).decode("utf-8"))
    return "\n\n".join(texts)


def load_text(name: str, split: str = "test") -> str:
    """Raw text of a corpus, joined as the standard protocol does.

    "austen": embedded; "wikitext2": wikitext-2-raw-v1 joined with "\\n\\n"; "ptb": ptb_text_only
    sentences joined with " "; "c4": validation shard 0, first 1100 documents joined with " ";
    anything else is read as a local UTF-8 text file.
    """
    if name == "austen":
        return austen(split)
    if name in ("wikitext2", "ptb", "c4"):
        import datasets  # lazily: hub access

        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        if name == "ptb":
            ds = datasets.load_dataset("ptb_text_only", "penn_treebank", split=split)
            return " ".join(ds["sentence"])
        ds = datasets.load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                   split="validation")  # fmt: skip
        return " ".join(ds[:1100]["text"])
    if not os.path.isfile(name):
        raise FileNotFoundError(f"unknown corpus {name!r}: not austen/wikitext2/ptb/c4 and no such text file")
    with open(name, encoding="utf-8") as f:
        return f.read()


def windows(tokens: np.ndarray, seq_len: int, stride: int | None = None, max_windows: int | None = None) -> np.ndarray:
    """(n, seq_len) windows; non-overlapping (⌊T/seq_len⌋ of them) unless a stride is given."""
    if seq_len <= 1:
        raise ValueError(f"seq_len must be > 1, got {seq_len}")
    tokens = np.asarray(tokens)
    stride = stride or seq_len
    starts = np.arange(0, len(tokens) - seq_len + 1, stride)
    if max_windows is not None:
        starts = starts[:max_windows]
    if len(starts) == 0:
        raise ValueError(f"{len(tokens)} tokens are fewer than one window of {seq_len}")
    return np.stack([tokens[s : s + seq_len] for s in starts])


def calibration_windows(tokens: np.ndarray, n: int, seq_len: int, key: jax.Array) -> np.ndarray:
    """n random windows of seq_len tokens (the standard 128 × 2048 calibration set), reproducible from `key`."""
    tokens = np.asarray(tokens)
    if len(tokens) <= seq_len:
        raise ValueError(f"{len(tokens)} tokens are too few for calibration windows of {seq_len}")
    starts = np.asarray(jax.random.randint(key, (n,), 0, len(tokens) - seq_len))
    return np.stack([tokens[s : s + seq_len] for s in starts])

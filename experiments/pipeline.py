"""Pipelines of steps: each step kind is a config dataclass plus a function `(model, config, ctx) -> model`.

A recipe is an ordered list of steps (Optax-style composition): `[smoothquant, quantize, evaluate]`.
Step kinds register once, with `@register("name", ConfigClass)` in their own module (listed in
`STEP_MODULES`). Configs are built and validated when a YAML file loads (`Step.from_config`), and each
kind may also `check` a step against the loaded model before any work runs.

Results of step prefixes are cached in the run directory (`PrefixCache`, keyed by the prefix's
configs), so recipes that share a prefix compute it once and an interrupted run resumes mid-pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import pickle
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from qjax.experiments.schema import ConfigError, from_dict

# Modules that register step kinds: a new method is one new file plus one line here.
STEP_MODULES = (
    "basic_steps",
    "rotate",
    "duquant",
    "smoothquant",
    "os_plus",
    "range_calibration",
    "gptq_step",
    "mixed_precision",
    "awq",
)


@dataclasses.dataclass
class Context:
    """What steps may use besides the model: data, randomness, where to write, progress."""

    key: jax.Array
    seed: int = 0  # the run's seed (data order of finetuning)
    calibration: np.ndarray | None = None  # (n, L) token windows
    train_tokens: np.ndarray | None = None
    eval_windows: np.ndarray | None = None
    batch_size: int = 8
    workdir: str | None = None  # a directory private to the current step (checkpoints)
    progress: bool = True
    label: str = ""  # recipe name, for progress bars
    metrics: dict = dataclasses.field(default_factory=dict)  # filled by evaluate steps

    def require(self, field: str, step: str):
        value = getattr(self, field)
        if value is None:
            raise ValueError(f"step {step!r} needs {field} data, and the run provides none")
        return value

    def calibration_batches(self, step: str) -> list[np.ndarray]:
        windows = self.require("calibration", step)
        return [windows[i : i + self.batch_size] for i in range(0, len(windows), self.batch_size)]


@dataclasses.dataclass(frozen=True)
class StepKind:
    name: str
    config: type
    fn: Callable[[nnx.Module, Any, Context], nnx.Module]
    check: Callable[[nnx.Module, Any], None] | None = None  # raises ValueError for a model it cannot handle
    cache: bool = True  # whether the model after this step is worth caching


STEPS: dict[str, StepKind] = {}


def register(name: str, config: type, *, check=None, cache: bool = True):
    """Decorator registering `fn(model, config, ctx) -> model` as step kind `name`."""

    def wrap(fn):
        if name in STEPS and STEPS[name].fn is not fn:
            raise ValueError(f"step kind {name!r} is registered twice")
        STEPS[name] = StepKind(name, config, fn, check, cache)
        return fn

    return wrap


def load_step_kinds() -> dict[str, StepKind]:
    for m in STEP_MODULES:
        importlib.import_module(f"qjax.experiments.{m}")
    return STEPS


@dataclasses.dataclass(frozen=True)
class Step:
    """One configured step: its kind and its validated config."""

    kind: str
    config: Any

    @classmethod
    def from_config(cls, value, where: str, source: str) -> Step:
        """`{kind: {...}}` (or a bare `kind`) from YAML; unknown kinds, keys and bad values are errors."""
        kinds = load_step_kinds()
        if isinstance(value, str):
            value = {value: {}}
        if not isinstance(value, dict) or len(value) != 1:
            raise ConfigError(f"{source}: {where!r} must be one mapping {{step_kind: {{...}}}}, got {value!r}")
        (kind, body), = value.items()
        if kind not in kinds:
            raise ConfigError(f"{source}: unknown step {kind!r} at {where!r}; known steps: {sorted(kinds)}")
        try:
            config = from_dict(kinds[kind].config, body or {}, f"{where}.{kind}", source)
        except (ValueError, TypeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{source}: {where}.{kind}: {e}") from e
        return cls(kind, config)

    def as_dict(self) -> dict:
        return {self.kind: _plain(self.config)}

    def check(self, model) -> None:
        kind = STEPS[self.kind]
        if kind.check is not None:
            kind.check(model, self.config)


def _plain(x):
    if dataclasses.is_dataclass(x):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def prefix_keys(base: dict, steps: list[Step]) -> list[str]:
    """A content key for every prefix steps[:i+1], given what else determines the result (`base`)."""
    keys, acc = [], [base]
    for s in steps:
        acc.append(s.as_dict())
        keys.append(hashlib.sha256(json.dumps(acc, sort_keys=True, default=str).encode()).hexdigest()[:16])
    return keys


class PrefixCache:
    """Models after step prefixes, as `root/<key>/` (graph definition + Orbax state + metrics).

    Each entry is written to a temporary directory and renamed into place, so a crash never leaves a
    half-written entry that looks complete.
    """

    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def has(self, key: str) -> bool:
        return os.path.exists(os.path.join(self.path(key), "DONE"))

    def save(self, key: str, model: nnx.Module, metrics: dict) -> None:
        import orbax.checkpoint as ocp

        final = self.path(key)
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        graphdef, state = nnx.split(model)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)  # no devices: picklable
        with open(os.path.join(tmp, "graph.pkl"), "wb") as f:
            pickle.dump((graphdef, abstract), f)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "state"), state)
            ckptr.wait_until_finished()
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f)
        open(os.path.join(tmp, "DONE"), "w").close()
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def load(self, key: str) -> tuple[nnx.Module, dict]:
        import orbax.checkpoint as ocp

        entry = self.path(key)
        with open(os.path.join(entry, "graph.pkl"), "rb") as f:
            graphdef, abstract = pickle.load(f)
        with ocp.StandardCheckpointer() as ckptr:
            state = ckptr.restore(os.path.join(entry, "state"), abstract)
        with open(os.path.join(entry, "metrics.json")) as f:
            metrics = json.load(f)
        return nnx.merge(graphdef, state), metrics

    def keep_only(self, keys: set[str]) -> None:
        """Delete entries (and leftovers of interrupted writes) not in `keys`."""
        if not os.path.isdir(self.root):
            return
        for name in os.listdir(self.root):
            if name.split(".")[0] not in keys or name.endswith(".tmp"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)


def run_steps(model: nnx.Module, steps: list[Step], ctx: Context, *, cache: PrefixCache | None = None,
              keys: list[str] | None = None) -> tuple[nnx.Module, dict]:  # fmt: skip
    """Apply `steps` in order; resumes after the longest cached prefix. Returns (model, step timings).

    The input model is not modified (each step gets a copy). Step i draws its randomness from
    fold_in(ctx.key, i), so a resumed or shared prefix gives the same result as a fresh run.
    """
    kinds = load_step_kinds()
    start, timings = 0, {}
    if cache is not None and keys is not None:
        for i in reversed(range(len(steps))):
            if kinds[steps[i].kind].cache and cache.has(keys[i]):
                model, saved = cache.load(keys[i])
                ctx.metrics.update(saved.get("metrics", {}))
                timings.update(saved.get("timings", {}))
                start = i + 1
                break
    base_key = ctx.key
    for i in range(start, len(steps)):
        step = steps[i]
        kind = kinds[step.kind]
        ctx.key = jax.random.fold_in(base_key, i)
        ctx.workdir = None if cache is None or keys is None else cache.path(keys[i]) + ".work"
        t0 = time.time()
        model = kind.fn(nnx.clone(model), step.config, ctx)
        timings[f"time_{i}_{step.kind}"] = round(time.time() - t0, 2)
        if cache is not None and keys is not None and kind.cache and i < len(steps) - 1:
            cache.save(keys[i], model, {"metrics": ctx.metrics, "timings": timings})
    ctx.key = base_key
    return model, timings

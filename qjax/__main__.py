"""`qjax` command line: `qjax demo` (built-in demonstration)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qjax", description="Quantization-aware experimentation for JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize a small model with several recipes and print a table")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from qjax.demo import run_demo

        print(run_demo(seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

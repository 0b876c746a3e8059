"""Small timing helpers shared by the benchmark scripts (median of repeated, synchronised runs)."""

from __future__ import annotations

import datetime
import platform
import statistics
import time

import jax


def time_fn(fn, *args, warmup: int = 2, repeats: int = 10) -> float:
    """Median wall time in seconds of `fn(*args)`, with results blocked on and warm-up excluded."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def environment() -> str:
    dev = jax.devices()[0]
    return (
        f"device: {dev.platform} ({getattr(dev, 'device_kind', '?')}), jax {jax.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}, date {datetime.date.today().isoformat()}"
    )


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def emit(text: str, out: str | None) -> str:
    """Print a report and, when `out` is given, also write it there."""
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return text

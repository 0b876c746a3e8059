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


def device_time(fn, arg_sets, *, warmup: int = 2, repeats: int = 20) -> tuple[float, str]:
    """Median seconds per call of `fn`, cycling through `arg_sets` so caches do not flatter repeated
    inputs. On GPU the kernels' own device time is taken from CUPTI (jax's Mosaic GPU profiler), so
    launch and Python overhead are excluded; elsewhere (or if CUPTI is unavailable) synchronised wall
    time. Returns (seconds, "cupti" | "wall")."""
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    if jax.default_backend() == "gpu":
        try:
            from jax.experimental.mosaic.gpu import profiler

            measured = profiler.measure(fn)
            ms = [measured(*arg_sets[i % len(arg_sets)])[1] for i in range(repeats)]
            if all(m is not None for m in ms):
                return statistics.median(ms) / 1e3, "cupti"
        except Exception:  # CUPTI taken by another tool, or an older jax: fall back to wall time
            pass
    times = []
    for i in range(repeats):
        args = arg_sets[i % len(arg_sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), "wall"


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

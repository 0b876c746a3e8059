"""Runs qjax's hand-written Triton kernels in Triton's CPU interpreter and saves their outputs.

Usage: TRITON_INTERPRET=1 python tests/triton_interpreter_run.py CASES.npz OUT.npz. The variable must be
set before triton is imported, hence a process of its own (started by tests/test_kernels.py). Output
buffers start poisoned (int32 min / NaN), so a tile the kernel skips shows in the result.
"""

import sys

import numpy as np
import torch

from qjax.kernels.common import KernelConfig
from qjax.kernels.triton_gemm import GROUP_M, launch_grid, w8a8_kernel


def run_w8a8(a, w, sa, sw, bias, blocks, raw) -> np.ndarray:
    m, k = a.shape
    n = w.shape[0]
    cfg = KernelConfig(tuple(int(b) for b in blocks), backend="triton")
    out = torch.full((m, n), -(2**31), dtype=torch.int32) if raw else torch.full((m, n), float("nan"), dtype=torch.float32)
    t = torch.from_numpy
    w8a8_kernel[launch_grid(m, n, cfg)](t(a), t(w), t(sa), t(sw), t(bias), m, n, k, out, BLOCK_M=cfg.blocks[0],
                                        BLOCK_N=cfg.blocks[1], BLOCK_K=cfg.blocks[2], GROUP_M=GROUP_M, RAW=bool(raw))  # fmt: skip
    return out.numpy()


def main(cases_path: str, out_path: str) -> None:
    cases = np.load(cases_path)
    names = sorted({key.split("/")[0] for key in cases.files})
    outputs = {}
    for name in names:
        a, w, sa, sw, bias, blocks, raw = (cases[f"{name}/{field}"] for field in ("a", "w", "sa", "sw", "bias", "blocks", "raw"))
        outputs[name] = run_w8a8(a, w, sa, sw, bias, blocks, bool(raw))
    np.savez(out_path, **outputs)


if __name__ == "__main__":
    main(*sys.argv[1:3])

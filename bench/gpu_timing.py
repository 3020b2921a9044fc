"""CUDA timing helpers shared by the ``bench.gpu`` sections."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from bench.common import rnd


def cuda_time(fn, reps: int, warmup: int = 2) -> list[float]:
    """Seconds per call of ``fn`` (each call timed with CUDA events, after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return out


def interleaved(fns: dict[str, Any], reps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Wall seconds per call (synchronised) with the contenders interleaved, order alternating."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    torch.cuda.synchronize()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            fns[n]()
            torch.cuda.synchronize()
            out[n].append(time.perf_counter() - t0)
    return out


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def gemm_peak(n: int = 8192, reps: int = 10) -> dict[str, float]:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ts = cuda_time(lambda: a @ b, reps, warmup=3)
    return {"best_tflops": rnd(2 * n**3 / min(ts) / 1e12), "median_tflops": rnd(2 * n**3 / med(ts) / 1e12)}


def try_run(fn, errors: dict[str, str], name: str) -> bool:
    """Run ``fn`` once (synchronised); a failure is recorded in ``errors`` under ``name``, not raised."""
    try:
        fn()
        torch.cuda.synchronize()
        return True
    except Exception as e:
        errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
        return False

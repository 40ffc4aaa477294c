"""Timing shared by the benchmarks: the median of repeated runs, synchronised on CUDA."""

from __future__ import annotations

import statistics
import time

import torch


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (each waits for the GPU to finish)."""
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)

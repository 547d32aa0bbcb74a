"""Median wall time of a GPU callable, shared by the benchmarks."""

from __future__ import annotations

import time

import torch

from mm_omni.platform import synchronize


def timeit(fn, iters: int, warmup: int = 3) -> float:
    """Median ms of ``fn()`` over ``iters`` runs after ``warmup`` (CUDA events; a host clock off the GPU)."""
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(iters):
        if not torch.cuda.is_available():
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]

"""Timing on the GPU, shared by the benchmarks: device sync, CUDA-event medians, freeing cached blocks."""

from __future__ import annotations

import gc
import statistics
import time

import torch


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_cuda(fn, *, budget_s: float = 0.3, min_reps: int = 3, max_reps: int = 30) -> float:
    """Median milliseconds of fn() over repetitions timed with CUDA events (one warm-up call first)."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = time.perf_counter() - t0
    reps = int(max(min_reps, min(max_reps, budget_s / max(one, 1e-6))))
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device memory bandwidth in bytes/s of a plain copy (each byte read once and written once, counted twice): the
    floor a memory-bound step is read against."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), budget_s=0.3, min_reps=10, max_reps=50)
    del src, dst
    free()
    return 2 * nbytes / (ms * 1e-3)

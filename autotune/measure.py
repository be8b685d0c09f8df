"""Timing candidates: warm-up, a cold L2 before every timed run, the median of the runs.

On the GPU ``time_gpu`` uses ``triton.testing.do_bench(return_mode="median")``, which already
does what a fair comparison needs: it runs ``fn`` once (JIT compile) and for ~``warmup`` ms
untimed, then before *every* timed repetition zeroes a 256 MiB buffer
(``driver.get_empty_cache_for_benchmark`` / ``clear_cache`` in triton/backends/nvidia/driver.py)
so no input is left in L2, and times each repetition with its own CUDA events (the flush itself
is outside the events). 256 MiB is several times the L2 of an H100 (50 MiB) or H200; on a device
whose L2 is more than half that, ``time_gpu`` times with its own loop and a buffer of 4 x L2.

A timer is any ``Callable[[fn], float]`` returning milliseconds; tests pass fakes.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

Timer = Callable[[Callable[[], object]], float]

DO_BENCH_FLUSH_BYTES = 256 * 2**20


def l2_bytes(device=None) -> int:
    import torch
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))


def time_gpu(fn: Callable[[], object], warmup_ms: float = 10, rep_ms: float = 40) -> float:
    """Median milliseconds of ``fn`` on the current CUDA device, L2 flushed before each run."""
    l2 = l2_bytes()
    if 2 * l2 <= DO_BENCH_FLUSH_BYTES:
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return _time_flushed(fn, 4 * l2, warmup_ms, rep_ms)


def _time_flushed(fn, flush_bytes: int, warmup_ms: float, rep_ms: float) -> float:
    import torch
    buf = torch.empty(flush_bytes, dtype=torch.uint8, device="cuda")
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est_ms))):
        fn()
    times = []
    for _ in range(max(5, int(rep_ms / est_ms))):
        buf.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        times.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in times)


def time_cpu(fn: Callable[[], object], warmup: int = 3, reps: int = 20, min_s: float = 0.0) -> float:
    """Median milliseconds of ``fn`` on the host (CPU kernels, the bench's --cpu cases)."""
    for _ in range(warmup):
        fn()
    times, t_start = [], time.perf_counter()
    while len(times) < reps or time.perf_counter() - t_start < min_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)

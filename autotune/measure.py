"""Timing candidates: warm-up, a cold L2 before every timed run, the median of the runs.

On the GPU ``time_gpu`` evicts L2 before every timed repetition by *reading* a buffer of
max(256 MiB, 4 x L2) and times each repetition with its own CUDA events (the flush is outside
them). ``triton.testing.do_bench`` flushes by zeroing a buffer instead, which leaves L2 full of
dirty lines that the timed kernel then pays to write back: over 81 launch configs of a 24 us GEMV
on an H200 it read 9.1 us above the device time (median; the read flush 2.8 us) and ranked the
configs worse against it (rank correlation 0.963 against 0.996; ``bench/matmul.py --sweep gemv``,
bench/RESULTS.md, tenth session). Reads leave clean lines.

A timer is any ``Callable[[fn], float]`` returning milliseconds; tests pass fakes.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

Timer = Callable[[Callable[[], object]], float]

FLUSH_BYTES = 256 * 2**20
_FLUSH: dict = {}


def l2_bytes(device=None) -> int:
    import torch
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))


def _flusher():
    """A function that reads a buffer several times the size of L2 (one per device, kept)."""
    import torch
    dev = torch.cuda.current_device()
    if dev not in _FLUSH:
        n = max(FLUSH_BYTES, 4 * l2_bytes(dev)) // 4
        buf = torch.zeros(n, dtype=torch.float32, device="cuda")
        sink = torch.empty((), dtype=torch.float32, device="cuda")
        _FLUSH[dev] = lambda: torch.sum(buf, dim=0, out=sink)
    return _FLUSH[dev]


def time_gpu(fn: Callable[[], object], warmup_ms: float = 10, rep_ms: float = 40) -> float:
    """Median milliseconds of ``fn`` on the current CUDA device, L2 evicted (clean) before each run."""
    import torch
    flush = _flusher()
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est_ms))):
        fn()
    times = []
    for _ in range(min(max(5, int(rep_ms / est_ms)), 1000)):
        flush()
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

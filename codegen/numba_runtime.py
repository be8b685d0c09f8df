"""Host side of the numba CPU kernels: split a kernel's rows over threads.

Generated kernels are serial ``nogil`` numba functions over a row range ``[lo, hi)``; the entry
point of each kernel module calls ``parallel_for`` here, which runs contiguous row chunks on a
small thread pool (the caller runs the first chunk itself). Serial kernels compile about twice
as fast as numba's ``parallel=True`` (no parfor lowering, no gufunc wrapper) and this keeps the
thread count and the grain under kiln's control: ``torch.get_num_threads()`` threads, as eager
and Inductor use, and no thread for a launch too small to pay for the hand-off (~10 us).
Nothing here is compiled into a kernel, so changing it never invalidates numba's disk cache.
"""
from __future__ import annotations

import gc
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _executor() -> ThreadPoolExecutor:
    """One pool for the process; its threads start lazily, up to one per CPU but the caller's."""
    global _pool
    if _pool is None:
        with _lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=max(1, _cpus() - 1),
                                           thread_name_prefix="kiln-cpu")
    return _pool


def threads() -> int:
    import torch          # not at import time: a process that only compiles kernels needs no torch
    return max(1, min(torch.get_num_threads(), _cpus()))


def _first_call(kernel, args) -> None:
    """Compile (or load from numba's disk cache) with the cyclic GC paused: numba's compiler
    allocates many small objects, and with torch loaded every collection it triggers walks
    hundreds of thousands of objects (measured: ~20% of a kernel's compile time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        kernel(0, 0, *args)
    finally:
        if enabled:
            gc.enable()


def same_memory(a, b) -> bool:
    """Do these two flat arrays start at the same address (an in-place launch)?"""
    return np.may_share_memory(a, b) and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]


def parallel_for(kernel, rows: int, min_rows: int, *args) -> None:
    """Run ``kernel(lo, hi, *args)`` over ``[0, rows)``, in chunks of at least ``min_rows`` rows
    spread over up to ``threads()`` threads."""
    if not kernel.overloads:
        _first_call(kernel, args)
    n = min(threads(), rows // max(min_rows, 1))
    if n <= 1:
        kernel(0, rows, *args)
        return
    bounds = [rows * i // n for i in range(n + 1)]
    pool = _executor()
    futs = [pool.submit(kernel, bounds[i], bounds[i + 1], *args) for i in range(1, n)]
    try:
        kernel(0, bounds[1], *args)
    finally:
        for f in futs:
            f.result()

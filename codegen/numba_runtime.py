"""Host side of the numba CPU kernels: split a kernel's rows over threads.

Generated kernels are serial ``nogil`` numba functions that take chunks of rows from a shared
atomic counter until none is left (``_rows(ctr, chunk, rows, ...)``); the entry point of each
kernel module calls ``parallel_for`` here, which runs the kernel on up to ``threads()`` threads
of a small pool (the caller is one of them), several chunks per thread, so a thread that starts
late or loses its core for a while costs one chunk, not half the kernel. The pool's threads
wait on plain locks (a futex each way, no Future or queue per launch). Serial kernels compile
about twice as fast as numba's ``parallel=True`` (no parfor lowering, no gufunc wrapper) and this keeps the
thread count and the grain under kiln's control: ``torch.get_num_threads()`` threads, as eager
and Inductor use, and no thread for a launch too small to pay for the hand-off (~10 us).
Nothing here is compiled into a kernel, so changing it never invalidates numba's disk cache.
"""
from __future__ import annotations

import gc
import os
import threading

import numpy as np

CHUNKS_PER_THREAD = 8     # dynamic balancing against a late or preempted thread; each chunk >= min_rows


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Worker:
    """A daemon thread that runs one job at a time: ``start`` hands it over, ``join`` waits for
    it and re-raises what it raised."""

    def __init__(self, i: int):
        self._go, self._done = threading.Lock(), threading.Lock()
        self._go.acquire()
        self._done.acquire()
        self._job = self._exc = None
        threading.Thread(target=self._loop, name=f"kiln-cpu-{i}", daemon=True).start()

    def _loop(self):
        while True:
            self._go.acquire()
            fn, args = self._job
            try:
                fn(*args)
            except BaseException as e:          # noqa: BLE001 - re-raised in the caller by join()
                self._exc = e
            self._job = None
            self._done.release()

    def start(self, fn, args):
        self._job = (fn, args)
        self._go.release()

    def join(self):
        self._done.acquire()
        exc, self._exc = self._exc, None
        if exc is not None:
            raise exc


_workers: list[_Worker] = []
_busy = threading.Lock()          # one launch at a time uses the workers; others run serially
_CPUS = None
_torch = None


def threads() -> int:
    global _CPUS, _torch
    if _torch is None:    # not at import time: a process that only compiles kernels needs no torch
        import torch
        _torch, _CPUS = torch, _cpus()
    return max(1, min(_torch.get_num_threads(), _CPUS))


def _first_call(kernel, args) -> None:
    """Compile (or load from numba's disk cache) with the cyclic GC paused: numba's compiler
    allocates many small objects, and with torch loaded every collection it triggers walks
    hundreds of thousands of objects (measured: ~20% of a kernel's compile time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        kernel(np.zeros(1, np.int64), 1, 0, *args)
    finally:
        if enabled:
            gc.enable()


def same_memory(a, b) -> bool:
    """Do these two flat arrays start at the same address (an in-place launch)?"""
    return a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.size > 0


def parallel_for(kernel, rows: int, min_rows: int, *args) -> None:
    """Run ``kernel`` over rows ``[0, rows)`` on up to ``threads()`` threads, each taking chunks of
    at least ``min_rows`` rows (about CHUNKS_PER_THREAD per thread) until none is left. A launch
    while another one holds the workers (from another Python thread) runs on its caller alone."""
    if not kernel.overloads:
        _first_call(kernel, args)
    ctr = np.zeros(1, np.int64)
    n = min(threads(), rows // max(min_rows, 1))
    if n <= 1 or not _busy.acquire(blocking=False):
        kernel(ctr, rows, rows, *args)
        return
    try:
        while len(_workers) < n - 1:
            _workers.append(_Worker(len(_workers)))
        chunk = max(min_rows, -(-rows // (n * CHUNKS_PER_THREAD)))
        for w in _workers[:n - 1]:
            w.start(kernel, (ctr, chunk, rows, *args))
        try:
            kernel(ctr, chunk, rows, *args)
        finally:
            for w in _workers[:n - 1]:
                w.join()
    finally:
        _busy.release()

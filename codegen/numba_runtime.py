"""Host side of the numba CPU kernels: split a kernel's rows over threads.

Generated kernels are serial ``nogil`` numba functions that take chunks of rows from a shared
atomic counter until none is left (``_rows(ctr, chunk, rows, ...)``); the entry point of each
kernel module calls ``parallel_for`` here, which runs the kernel on up to ``threads()`` threads
of a small pool (the caller is one of them), several chunks per thread, so a thread that starts
late or loses its core for a while costs one chunk, not half the kernel.

The threads are kiln's own daemon threads, waiting on plain locks (a futex each way, no Future
or queue per launch); the launcher waits for finished chunks, never for a thread that has not
started. ``KILN_CPU_POOL=omp`` runs the chunks on PyTorch's own OpenMP team instead
(``GOMP_parallel`` of the libgomp torch loaded, through a ctypes callback): no separate thread
shares a core with an OpenMP thread still spinning after an eager op, but GOMP_parallel ends
in a barrier, so on a machine where other processes hold the cores a launch waits for a
descheduled team thread (measured on 2 shared cores: kiln's median 8-12 ms where the own pool
gave 2.4-5 ms, fp32 4096x2048 softmax/RMSNorm/GELU; eager and Inductor showed the same
8-50 ms stalls).

Serial kernels compile about twice as fast as numba's ``parallel=True`` (no parfor lowering,
no gufunc wrapper) and this keeps the thread count and the grain under kiln's control: ``torch.get_num_threads()`` threads, as eager
and Inductor use, and no thread for a launch too small to pay for the hand-off (~10 us).
Nothing here is compiled into a kernel, so changing it never invalidates numba's disk cache.
"""
from __future__ import annotations

import ctypes
import gc
import itertools
import os
import threading
import time

import numpy as np

CHUNKS_PER_THREAD = 8     # dynamic balancing against a late or preempted thread; each chunk >= min_rows


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Worker:
    """A daemon thread that runs one job at a time (``start`` hands it over). Nobody joins it:
    the launching thread waits for the chunks the kernel counts as finished (a worker that
    started late finds none left and returns without touching memory); a job's exception is
    kept and raised by the next launch that finds this worker idle."""

    def __init__(self, i: int):
        self._go = threading.Lock()
        self._go.acquire()
        self._job = self.error = None
        self.idle = True
        threading.Thread(target=self._loop, name=f"kiln-cpu-{i}", daemon=True).start()

    def _loop(self):
        while True:
            self._go.acquire()
            fn, args = self._job
            try:
                fn(*args)
            except BaseException as e:          # noqa: BLE001 - re-raised by a later launch
                self.error = e
            self._job = None
            self.idle = True

    def start(self, fn, args):
        self.idle = False
        self._job = (fn, args)
        self._go.release()


_workers: list[_Worker] = []
_busy = threading.Lock()          # one launch at a time hands out work; others run serially
_CPUS = None
_torch = None


_omp = None                       # libgomp's GOMP_parallel, False when not usable
_omp_jobs: dict[int, tuple] = {}
_omp_keys = itertools.count(1)


def _omp_body(key):
    fn, args, errors = _omp_jobs[key]
    try:
        fn(*args)
    except BaseException as e:                  # noqa: BLE001 - re-raised by the launching thread
        errors.append(e)


_OMP_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_omp_body)


def _openmp():
    """PyTorch's libgomp, already loaded by torch, when ATen's parallel backend is OpenMP."""
    global _omp
    if _omp is None:
        _omp = False
        try:
            if os.environ.get("KILN_CPU_POOL", "threads") == "omp" and \
                    "parallel backend: OpenMP" in _torch.__config__.parallel_info():
                path = os.path.join(os.path.dirname(_torch.__file__), "lib", "libgomp.so.1")
                with open("/proc/self/maps") as f:
                    loaded = path in f.read()
                if loaded:
                    lib = ctypes.CDLL(path)
                    lib.GOMP_parallel.argtypes = [type(_OMP_BODY), ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                    lib.GOMP_parallel.restype = None
                    _omp = lib.GOMP_parallel
        except (OSError, AttributeError):
            _omp = False
    return _omp


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
        kernel(np.zeros(2, np.int64), 1, 0, *args)
    finally:
        if enabled:
            gc.enable()


def same_memory(a, b) -> bool:
    """Do these two flat arrays start at the same address (an in-place launch)?"""
    return a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.size > 0


def parallel_for(kernel, rows: int, min_rows: int, *args) -> None:
    """Run ``kernel`` over rows ``[0, rows)`` on up to ``threads()`` threads, each taking chunks of
    at least ``min_rows`` rows (about CHUNKS_PER_THREAD per thread) until none is left; return
    when every chunk is done. A launch while another one is handing out work (from another
    Python thread) runs on its caller alone."""
    if not kernel.overloads:
        _first_call(kernel, args)
    ctr = np.zeros(2, np.int64)           # chunks taken, chunks done
    n = min(threads(), rows // max(min_rows, 1))
    if n <= 1:
        kernel(ctr, rows, rows, *args)
        return
    chunk = max(min_rows, -(-rows // (n * CHUNKS_PER_THREAD)))
    omp = _openmp()
    if omp:
        key, errors = next(_omp_keys), []
        _omp_jobs[key] = (kernel, (ctr, chunk, rows, *args), errors)
        try:
            omp(_OMP_BODY, key, n, 0)       # ctypes releases the GIL; each thread takes it to dispatch
        finally:
            del _omp_jobs[key]
        if errors:
            raise errors[0]
        return
    if not _busy.acquire(blocking=False):
        kernel(ctr, rows, rows, *args)
        return
    try:
        while len(_workers) < n - 1:
            _workers.append(_Worker(len(_workers)))
        for w in _workers:
            if w.idle and w.error is not None:
                e, w.error = w.error, None
                raise e
        team = [w for w in _workers if w.idle][:n - 1]
        for w in team:
            w.start(kernel, (ctr, chunk, rows, *args))
        kernel(ctr, chunk, rows, *args)
        nchunks = -(-rows // chunk)
        while ctr[1] < nchunks:             # chunks another thread took are still running
            failed = next((w for w in team if w.error is not None), None)
            if failed is not None:
                e, failed.error = failed.error, None
                raise e
            time.sleep(0)
    finally:
        _busy.release()

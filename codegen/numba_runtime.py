"""Host side of the numba CPU kernels: split a kernel's rows over threads.

Generated kernels are serial ``nogil`` numba functions that take chunks of rows from a shared
atomic counter until none is left (``_rows(ctr, chunk, rows, ...)``); the entry point of each
kernel module calls ``parallel_for`` here, which runs the kernel on up to ``threads()`` threads
of a small pool (the caller is one of them), several chunks per thread, so a thread that starts
late or loses its core for a while costs one chunk, not half the kernel.

Two teams can run the chunks. PyTorch's own OpenMP team (``GOMP_parallel`` of the libgomp
torch loaded, running the kernel module's native entry: a numba cfunc over the launch's
arguments as one int64 block, so no Python runs on libgomp's threads): after an eager op its
threads spin waiting for more work (for tens of ms on the benchmark VM's Xeon), so they start
at once, where a separate kiln thread shares a core with a spinning one (a 4096x2048 softmax
right after an eager one: 6.0 ms on kiln's threads, 4.2 on the team, 3.9 either way alone);
but GOMP_parallel ends in a barrier, so when other processes hold the cores a launch waits
for a descheduled team thread (measured on 2 shared cores: medians of 8-12 ms, fp32 4096x2048
softmax/RMSNorm/GELU, as eager's and Inductor's own stalls). Or kiln's
own daemon threads, waiting on plain locks (a futex each way, no Future or queue per launch),
where the launcher waits for finished chunks, never for a thread that has not started (2.4-5 ms
medians under the same load). PoolChoice picks per kernel by measured launch time.

Serial kernels compile about twice as fast as numba's ``parallel=True`` (no parfor lowering,
no gufunc wrapper) and this keeps the thread count and the grain under kiln's control: ``torch.get_num_threads()`` threads, as eager
and Inductor use, and no thread for a launch too small to pay for the hand-off (~10 us).
Nothing here is compiled into a kernel, so changing it never invalidates numba's disk cache
(the native entry is compiled from the kernel module, on its first launch on the team).
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import os
import threading
import time

import numpy as np

# The adaptive choice unless KILN_CPU_POOL says otherwise. The OpenMP team runs a kernel's native
# entry (a numba cfunc over one int64 argument block: no Python, no GIL on libgomp's threads);
# a kernel without one (buffers passed as numpy arrays) stays on kiln's threads under "auto".
# Python callbacks on libgomp's threads ("omp" for such a kernel) are what crashed one
# full-suite run of four (SIGSEGV in a later eager ATen op of the same process).
DEFAULT_POOL = "auto"
POOLS = ("threads", "omp", "auto")


def pool_setting() -> str:
    """KILN_CPU_POOL, checked: a misspelt value would otherwise silently pick kiln's threads."""
    pool = os.environ.get("KILN_CPU_POOL", DEFAULT_POOL)
    if pool not in POOLS:
        raise ValueError(f"KILN_CPU_POOL={pool!r} is not a thread team; use one of {', '.join(POOLS)}")
    return pool
MIN_CHUNKS_PER_THREAD = 4  # a thread joins only with this many min_rows chunks for it: handing work over
                           # costs ~25 us on kiln's own threads, what a [512, 256] layer norm takes alone
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
if hasattr(os, "register_at_fork"):                 # a forked child has none of these threads
    os.register_at_fork(after_in_child=_workers.clear)
_CPUS = None
_torch = None


_omp = None                       # libgomp's GOMP_parallel, False when not usable
_omp_raw = None                   # the same, taking a native function's address
_natives: dict = {}               # a kernel's Python-level native entry -> its compiled cfunc
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
            if pool_setting() in ("auto", "omp") and \
                    "parallel backend: OpenMP" in _torch.__config__.parallel_info():
                path = os.path.join(os.path.dirname(_torch.__file__), "lib", "libgomp.so.1")
                with open("/proc/self/maps") as f:
                    loaded = path in f.read()
                if loaded:
                    global _omp_raw
                    lib = ctypes.CDLL(path)
                    fn = lib["GOMP_parallel"]           # (indexing makes a new function object)
                    fn.argtypes = [type(_OMP_BODY), ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                    fn.restype = None
                    raw = lib["GOMP_parallel"]
                    raw.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                    raw.restype = None
                    _omp, _omp_raw = fn, raw
        except (OSError, AttributeError):
            _omp = False
    return _omp


def threads() -> int:
    global _CPUS, _torch
    if _torch is None:    # not at import time: a process that only compiles kernels needs no torch
        import torch
        _torch, _CPUS = torch, _cpus()
    return max(1, min(_torch.get_num_threads(), _CPUS))


@contextlib.contextmanager
def _gc_paused():
    """Numba compiles with the cyclic GC paused: its compiler allocates many small objects, and
    with torch loaded every collection it triggers walks hundreds of thousands of objects
    (measured: ~20% of a kernel's compile time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _first_call(kernel, args) -> None:
    """Compile (or load from numba's disk cache) with the cyclic GC paused."""
    with _gc_paused():
        kernel(np.zeros(2, np.int64), 1, 0, *args)


def same_memory(a, b) -> bool:
    """Do these two flat arrays start at the same address (an in-place launch)? The bounds test
    first: it is a tenth of the cost of reading both addresses, and most launches fail it."""
    return np.may_share_memory(a, b) and a.__array_interface__["data"][0] == b.__array_interface__["data"][0] \
        and a.size > 0


def _run_omp(omp, kernel, n, job) -> None:
    key, errors = next(_omp_keys), []
    _omp_jobs[key] = (kernel, job, errors)
    try:
        omp(_OMP_BODY, key, n, 0)           # ctypes releases the GIL; each thread takes it to dispatch
    finally:
        del _omp_jobs[key]
    if errors:
        raise errors[0]


def _native(entry):
    """The kernel's native entry compiled (numba's disk cache keeps it), once per process."""
    cf = _natives.get(entry)
    if cf is None:
        import numba
        with _gc_paused():
            cf = _natives[entry] = numba.cfunc(numba.types.void(numba.types.voidptr), nopython=True,
                                               cache=True)(entry)
    return cf


def _run_native(entry, n, job) -> None:
    """libgomp's team runs the kernel's native entry over the launch's arguments as one int64
    block (the chunk counter's address first); ctypes releases the GIL for the whole launch."""
    ctr, rest = job[0], job[1:]
    block = np.array([ctr.ctypes.data, *rest], np.int64)
    _omp_raw(_native(entry).address, block.ctypes.data, n, 0)


def _run_own(kernel, n, job, rows, chunk) -> None:
    if not _busy.acquire(blocking=False):
        kernel(job[0], rows, rows, *job[3:])
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
            w.start(kernel, job)
        kernel(*job)
        ctr, nchunks = job[0], -(-rows // chunk)
        while ctr[1] < nchunks:             # chunks another thread took are still running
            failed = next((w for w in team if w.error is not None), None)
            if failed is not None:
                e, failed.error = failed.error, None
                raise e
            time.sleep(0)
    finally:
        _busy.release()


class PoolChoice:
    """Which team runs a kernel's launches, by their measured wall time: a decayed average per
    team, the faster one used, the other re-tried now and then (every EXPLORE-th launch, the
    interval doubling up to MAX_EXPLORE while it keeps losing) so a change of load is noticed.
    On a quiet machine PyTorch's OpenMP team wins (its threads are already awake after an eager
    op, and kiln's thread would share a core with one spinning); when other processes hold the
    cores its closing barrier waits for descheduled threads (8-12 ms stalls measured) and
    kiln's own pool wins."""
    EXPLORE, MAX_EXPLORE = 16, 256
    DECAY = 0.25

    def __init__(self):
        self.avg = {"omp": 0.0, "own": 0.0}
        self.seen: set[str] = set()     # a team's first launch (thread start-up) is not timed
        self.interval, self.next = self.EXPLORE, self.EXPLORE
        self.calls = 0

    def best(self) -> str:
        return min(self.avg, key=self.avg.get)

    def pick(self) -> str:
        self.calls += 1
        untried = [k for k, v in self.avg.items() if v == 0.0]
        if untried:
            return untried[0]
        best = self.best()
        if self.calls >= self.next:
            return "own" if best == "omp" else "omp"
        return best

    def record(self, team: str, seconds: float) -> None:
        if team not in self.seen:
            self.seen.add(team)
            return
        explored = self.calls >= self.next and 0.0 not in self.avg.values() and team != self.best()
        a = self.avg[team]
        # a re-try replaces that team's stale estimate; the team in use is averaged
        self.avg[team] = seconds if a == 0.0 or explored else a + self.DECAY * (seconds - a)
        if explored:
            lost = team != self.best()
            self.interval = min(self.interval * 2, self.MAX_EXPLORE) if lost else self.EXPLORE
            self.next = self.calls + self.interval


_choices: dict = {}


def parallel_for(kernel, rows: int, min_rows: int, *args, native=None) -> None:
    """Run ``kernel`` over rows ``[0, rows)`` on up to ``threads()`` threads, each taking chunks of
    at least ``min_rows`` rows (about CHUNKS_PER_THREAD per thread) until none is left; return
    when every chunk is done. The team is PyTorch's OpenMP team or kiln's own pool, chosen per
    kernel by PoolChoice (``KILN_CPU_POOL=omp|threads`` forces one). A launch while another one
    is handing out work to the own pool (from another Python thread) runs on its caller alone."""
    if not kernel.overloads:
        _first_call(kernel, args)
    ctr = np.zeros(2, np.int64)           # chunks taken, chunks done
    n = min(threads(), rows // max(min_rows * MIN_CHUNKS_PER_THREAD, 1))
    if n <= 1:
        kernel(ctr, rows, rows, *args)
        return
    chunk = max(min_rows, -(-rows // (n * CHUNKS_PER_THREAD)))
    job = (ctr, chunk, rows, *args)
    pool = pool_setting()
    omp = _openmp() if pool != "threads" else False
    native = native if omp and all(type(a) is int for a in args) else None
    if not omp or (pool == "auto" and native is None):
        _run_own(kernel, n, job, rows, chunk)
        return
    if pool == "omp":
        _run_native(native, n, job) if native is not None else _run_omp(omp, kernel, n, job)
        return
    choice = _choices.get(kernel)
    if choice is None:
        choice = _choices[kernel] = PoolChoice()
    team = choice.pick()
    t0 = time.perf_counter()
    if team == "omp":
        _run_native(native, n, job)
    else:
        _run_own(kernel, n, job, rows, chunk)
    choice.record(team, time.perf_counter() - t0)

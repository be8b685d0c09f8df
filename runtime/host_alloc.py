"""Fresh CPU buffers on transparent huge pages.

A compiled graph's outputs are new tensors on every call. At a few MiB and more glibc hands out
a fresh mmap for each, and the kernel that writes it first takes one page fault per 4 KiB page:
on the 2-core benchmark VM a 32 MiB fp32 output cost ~11 ms of faults, several times the fused
kernel that fills it. Where the kernel's THP mode is ``madvise`` (the common default), asking for
huge pages on the buffer before anything touches it makes that 16 faults of 2 MiB (measured:
allocate + fill 32 MiB 11.1 -> 1.9 ms). Only the 2 MiB-aligned interior of each buffer is
advised, so nothing outside it changes; elsewhere (THP ``always`` or ``never``, not Linux) this
does nothing.

Buffers the caller has let go are recycled (OutputPool): a graph called in a loop, each result
dropped before or after the next call, gets back memory already faulted in instead of asking
glibc for a fresh mmap each time (allocate + first touch of 32 MiB: ~8-11 ms on the benchmark VM
with 4 KiB pages, ~3.6 ms with huge pages; the softmax kernel that fills it ~4 ms). A pooled
storage is handed out again only when nothing but the pool holds it (its use count: no tensor,
view or numpy array of it is alive), so a result the caller keeps is never written over; idle
storages beyond POOL_IDLE_BYTES are let go, oldest first. Eager and Inductor allocate each output
from glibc (PyTorch has no caching allocator on the CPU).
"""
from __future__ import annotations

import ctypes
import sys
import threading

import torch

MIN_BYTES = 4 << 20          # smaller buffers come from glibc's heap, already faulted in
_HUGE = 1 << 21
_MADV_HUGEPAGE = 14
_madvise = None              # libc's madvise, False where huge pages are not to be asked for


def _libc_madvise():
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
                    if "[madvise]" in f.read():
                        fn = ctypes.CDLL(None, use_errno=True).madvise
                        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                        fn.restype = ctypes.c_int
                        _madvise = fn
            except (OSError, AttributeError):
                pass
    return _madvise


def advise_huge(t: torch.Tensor) -> None:
    """Ask for huge pages under the 2 MiB-aligned interior of a CPU tensor's storage."""
    if t.device.type != "cpu":
        return
    n = t.untyped_storage().nbytes()
    if n < MIN_BYTES:
        return
    fn = _libc_madvise()
    if not fn:
        return
    p = t.untyped_storage().data_ptr()
    lo, hi = (p + _HUGE - 1) & ~(_HUGE - 1), (p + n) & ~(_HUGE - 1)
    if hi > lo:
        fn(lo, hi - lo, _MADV_HUGEPAGE)


POOL_IDLE_BYTES = 256 << 20   # idle pooled storages kept at most (bytes)
POOL_ENTRIES = 64              # storages tracked at most (held or idle); beyond, not pooled


def _use_count(st) -> int:
    """How many tensors (and storage objects) hold this storage."""
    return torch._C._storage_Use_Count(st._cdata)


class OutputPool:
    """Large CPU storages kiln allocated, by size, for reuse once only the pool holds them."""

    def __init__(self, idle_bytes: int = POOL_IDLE_BYTES, entries: int = POOL_ENTRIES):
        self.idle_bytes, self.entries = idle_bytes, entries
        self.stores: list = []          # UntypedStorage, oldest first
        self.lock = threading.Lock()    # two threads calling graphs must not take the same one

    def take(self, nbytes: int, shape, strides, dtype) -> torch.Tensor | None:
        """A tensor over an idle storage of exactly ``nbytes`` (moved to the back: most recently
        used), else None. Made under the lock: until the tensor holds it, another thread would
        see the storage idle too."""
        with self.lock:
            for i, st in enumerate(self.stores):
                if st.nbytes() == nbytes and _use_count(st) == 1:
                    self.stores.append(self.stores.pop(i))
                    return torch.empty(0, dtype=dtype).set_(st, 0, shape, strides)
        return None

    def add(self, st) -> None:
        """Track a fresh storage, letting go of idle ones, oldest first, past the limits."""
        with self.lock:
            if st.nbytes() > self.idle_bytes:
                return
            self.stores.append(st)
            idle = sum(s.nbytes() for s in self.stores if _use_count(s) == 1)
            for s in list(self.stores):
                if idle <= self.idle_bytes and len(self.stores) <= self.entries:
                    break
                if _use_count(s) == 1 and s is not st:
                    self.stores.remove(s)
                    idle -= s.nbytes()
            if len(self.stores) > self.entries:        # all held: stop tracking the newest
                self.stores.remove(st)


POOL = OutputPool()


def empty_strided(shape, strides, dtype, device, pool: OutputPool | None = POOL) -> torch.Tensor:
    """``torch.empty_strided`` whose large CPU storage is on huge pages where the kernel allows,
    taken from ``pool`` when one of its size is idle there (module docstring)."""
    dev = torch.device(device)
    if dev.type != "cpu":
        return torch.empty_strided(shape, strides, dtype=dtype, device=dev)
    nbytes = _nbytes(shape, strides, dtype)
    if nbytes >= MIN_BYTES and pool is not None:
        t = pool.take(nbytes, shape, strides, dtype)
        if t is not None:
            return t
    t = torch.empty_strided(shape, strides, dtype=dtype, device=dev)
    if nbytes >= MIN_BYTES:
        advise_huge(t)
        if pool is not None:
            pool.add(t.untyped_storage())
    return t


def _nbytes(shape, strides, dtype) -> int:
    """Bytes of the storage torch.empty_strided makes for this layout."""
    if any(s == 0 for s in shape):
        return 0
    return (1 + sum((n - 1) * st for n, st in zip(shape, strides))) * dtype.itemsize

"""Huge-page advice on fresh CPU outputs (runtime/host_alloc.py): only the 2 MiB-aligned
interior of a large buffer is advised, small buffers are left alone, and the tensors behave."""
from __future__ import annotations

import torch

from kiln.runtime import host_alloc


def test_advises_only_the_aligned_interior(monkeypatch):
    calls = []
    monkeypatch.setattr(host_alloc, "_madvise", lambda p, n, advice: calls.append((p, n, advice)) or 0)
    t = host_alloc.empty_strided((4096, 2048), (2048, 1), torch.float32, torch.device("cpu"))
    assert t.shape == (4096, 2048) and t.stride() == (2048, 1) and t.dtype == torch.float32
    (p, n, advice), = calls
    base, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
    assert advice == 14 and p % (1 << 21) == 0 and n % (1 << 21) == 0
    assert base <= p and p + n <= base + size and n >= size - 2 * (1 << 21)
    t.fill_(2.0)
    assert float(t.sum()) == 2.0 * t.numel()


def test_small_and_non_cpu_buffers_are_left_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(host_alloc, "_madvise", lambda *a: calls.append(a) or 0)
    host_alloc.empty_strided((64, 64), (64, 1), torch.float32, torch.device("cpu"))
    host_alloc.advise_huge(torch.empty(0))
    assert calls == []


def test_real_advice_is_harmless():
    """On this machine, whatever its THP mode: a large output is usable and zero-initialisable."""
    t = host_alloc.empty_strided((1024, 4096), (4096, 1), torch.float32, torch.device("cpu"))
    t.zero_()
    assert int(torch.count_nonzero(t)) == 0

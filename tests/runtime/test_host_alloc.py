"""Fresh CPU outputs (runtime/host_alloc.py): huge-page advice on only the 2 MiB-aligned interior
of a large buffer, small buffers left alone; and the output pool, which hands a large buffer out
again only once nothing but the pool holds it."""
from __future__ import annotations

import torch

import kiln
from kiln.runtime import host_alloc

MB4 = (1024, 1024)      # fp32: 4 MiB, the least the pool takes (host_alloc.MIN_BYTES)


def test_advises_only_the_aligned_interior(monkeypatch):
    calls = []
    monkeypatch.setattr(host_alloc, "_madvise", lambda p, n, advice: calls.append((p, n, advice)) or 0)
    t = host_alloc.empty_strided((4096, 2048), (2048, 1), torch.float32, torch.device("cpu"), pool=None)
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


def test_pool_recycles_only_what_the_caller_let_go():
    pool = host_alloc.OutputPool()
    make = lambda: host_alloc.empty_strided(MB4, (1024, 1), torch.float32, "cpu", pool)   # noqa: E731
    a = make()
    p = a.data_ptr()
    b = make()
    assert b.data_ptr() != p                    # a is held
    view = a[3:5]
    del a
    assert make().data_ptr() not in (p, b.data_ptr())      # a's view still holds its storage
    del view
    c = make()
    assert c.data_ptr() == p and c.shape == MB4 and c.stride() == (1024, 1)
    d = host_alloc.empty_strided((512, 1024), (1024, 1), torch.float64, "cpu", pool)   # same bytes, other dtype
    assert d.dtype == torch.float64 and d.data_ptr() not in (p, b.data_ptr())   # bytes are bytes
    arr = c.numpy()
    del c
    assert make().data_ptr() != p               # a numpy array of it holds it too
    del arr


def test_pool_lets_go_of_idle_storages_past_its_limits():
    pool = host_alloc.OutputPool(idle_bytes=2 * (4 << 20), entries=3)
    held = [host_alloc.empty_strided(MB4, (1024, 1), torch.float32, "cpu", pool) for _ in range(3)]
    assert len(pool.stores) == 3
    held.append(host_alloc.empty_strided(MB4, (1024, 1), torch.float32, "cpu", pool))
    assert len(pool.stores) == 3                # all held: the fourth is not tracked
    del held[:]
    big = host_alloc.empty_strided((2048, 1024), (1024, 1), torch.float32, "cpu", pool)   # 8 MiB, fresh
    # the limits are kept as a storage is added: the oldest idle ones went
    assert sum(s.nbytes() for s in pool.stores if host_alloc._use_count(s) == 1) <= 2 * (4 << 20)
    assert any(s.data_ptr() == big.data_ptr() for s in pool.stores)


def test_compiled_outputs_held_across_calls_keep_their_values():
    """A graph's large outputs come from the pool: a result the caller keeps is never written by
    a later call, and one it dropped is reused."""
    f = kiln.compile(lambda x: torch.softmax(x, -1), target="cpu")
    x1, x2 = torch.randn(MB4), torch.randn(MB4)
    y1 = f(x1)
    keep = y1.clone()
    y2 = f(x2)
    assert y2.data_ptr() != y1.data_ptr()
    torch.testing.assert_close(y1, keep, rtol=0, atol=0)
    torch.testing.assert_close(y2, torch.softmax(x2, -1))
    p = y1.data_ptr()
    del y1
    y3 = f(x1)
    assert y3.data_ptr() == p
    torch.testing.assert_close(y3, keep)
    torch.testing.assert_close(y2, torch.softmax(x2, -1))

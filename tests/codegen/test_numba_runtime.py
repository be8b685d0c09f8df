"""The numba kernels' host runtime (codegen/numba_runtime.py): chunked launches give eager's
result on each team (PyTorch's OpenMP team, kiln's own pool, the adaptive choice), and the
choice follows measured launch times."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import kiln
from kiln.api import compile_graph
from kiln.codegen import numba_runtime
from kiln.codegen.numba_runtime import PoolChoice
from kiln.ir.capture import from_fx
from kiln.ir.decompose import decomposition_table


def test_choice_follows_the_faster_team_and_keeps_trying_the_other():
    c = PoolChoice()
    picks = []
    for _ in range(64):
        t = c.pick()
        picks.append(t)
        c.record(t, 0.001 if t == "omp" else 0.003)
    assert picks[:4] == ["omp", "omp", "own", "own"]       # each team's first launch is not timed
    assert picks.count("omp") > 56 and 0 < picks[4:].count("own") <= 64 // PoolChoice.EXPLORE
    for _ in range(64):                 # the OpenMP team starts stalling (another process took a core)
        t = c.pick()
        c.record(t, 0.010 if t == "omp" else 0.003)
    assert [c.pick() for _ in range(8)].count("own") >= 7


@pytest.mark.parametrize("pool", ["auto", "omp", "threads"])
def test_multithreaded_launch_matches_eager(pool, monkeypatch):
    """The OpenMP team and the adaptive choice (the default: see numba_runtime.DEFAULT_POOL) run
    in a child process, so a crash they might cause stays there and fails this test alone."""
    if numba_runtime.threads() < 2:
        pytest.skip("one CPU: launches run on the caller alone")
    if pool != "threads":
        import subprocess
        import sys
        env = {**__import__("os").environ, "KILN_CPU_POOL": pool}
        code = f"import sys; sys.path[:0] = {sys.path!r}; import {__name__} as t; t._launch_matches_eager()"
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return
    monkeypatch.setenv("KILN_CPU_POOL", pool)
    _launch_matches_eager()


def _launch_matches_eager():
    def f(x, b):
        return torch.softmax(x * 2, -1), torch.nn.functional.gelu(x + b)
    x, b = torch.randn(4096, 64), torch.randn(64)
    gm = make_fx(f, decomposition_table=decomposition_table())(x, b)
    compiled, _ = compile_graph(from_fx(gm), kiln.Options(target="cpu"))
    want = f(x, b)
    for _ in range(20):                 # enough launches for the adaptive choice to try both teams
        got = compiled(x, b)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)     # gelu: erf32 is 4e-7 absolute


def test_openmp_team_runs_native_entries(monkeypatch):
    """On PyTorch's OpenMP team a kernel runs its native entry (a numba cfunc over an int64
    argument block), never a Python callback on libgomp's threads; eager's result."""
    if numba_runtime.threads() < 2:
        pytest.skip("one CPU: launches run on the caller alone")
    monkeypatch.setenv("KILN_CPU_POOL", "omp")
    if not numba_runtime._openmp():
        pytest.skip("ATen's parallel backend is not OpenMP")

    def callback(*a):
        raise AssertionError("a Python callback ran on the OpenMP team")
    native = []
    run_native = numba_runtime._run_native
    monkeypatch.setattr(numba_runtime, "_run_omp", callback)
    monkeypatch.setattr(numba_runtime, "_run_native", lambda *a: native.append(a[0]) or run_native(*a))
    _launch_matches_eager()
    assert native and all(n.__name__.startswith("_native_rows") for n in native)


def test_unknown_pool_is_rejected(monkeypatch):
    monkeypatch.setenv("KILN_CPU_POOL", "openmp")
    with pytest.raises(ValueError, match="KILN_CPU_POOL='openmp'.*threads, omp, auto"):
        numba_runtime.pool_setting()

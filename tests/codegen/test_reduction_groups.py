"""Reductions of one row that do not depend on one another share one walk of it: a corrected
variance's sum(d) and sum(d * d) are one loop when the row is looped (one read of it from memory
less) and one tl.reduce over a tuple when it fits (one exchange between warps less). Dependent
ones (softmax's max, then its sum) stay in order, except that a looped row's max and sum of
exponentials can share a walk as an online softmax (off by default; tested turned on). Checked
against eager on every CPU-runnable target, rows that fit and rows that loop."""
from __future__ import annotations

import pytest
import torch
from test_cuda_sources import _groups

import kiln
from kiln.codegen.lower import Reduce, lower, refs
from kiln.codegen.schedule_stmts import plan_stages
from kiln.codegen.triton_gen import RBLOCK_MAX, render

F = torch.nn.functional


def _norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b)


def _stats(x):
    # sum, max (NaN-propagating) and sum of squares of one row: independent, one walk
    return x.sum(-1), x.amax(-1), (x * x).sum(-1), torch.softmax(x, -1)


def _stage_kinds(fn, *args) -> list[list[list[str]]]:
    out = []
    for n in _groups(fn, *args):
        _, stages, _ = plan_stages(lower(n))
        out.append([[r.expr.kind for r in st.reduces] for st in stages])
    return out


def test_independent_reductions_share_a_stage():
    x, w = torch.randn(8, 64), torch.randn(64)
    # layer_norm: the mean, then sum(d) and sum(d * d) together
    assert _stage_kinds(_norm, x, w, w) == [[["mean"], ["sum", "sum"]]]
    # sum, amax, sum of squares and softmax's max in one walk; softmax's sum needs its max
    assert _stage_kinds(_stats, x) == [[["sum", "max", "sum", "max"], ["sum"]]]
    for n in _groups(_stats, x):
        lk = lower(n)
        by_var = {s.var: s for s in lk.stmts}
        for st in plan_stages(lk)[1]:       # no member reads another member of its stage
            mine = {r.var for r in st.reduces}
            stack, seen = [r.expr.src for r in st.reduces], set()
            while stack:
                v = stack.pop()
                assert v not in mine, v
                s = by_var.get(v)
                if s is not None and v not in seen:
                    seen.add(v)
                    stack += [s.expr.src] if isinstance(s.expr, Reduce) else refs(s.expr)


def test_triton_source_reduces_a_tuple_once():
    x, w = torch.randn(8, 64), torch.randn(64)
    (n,) = _groups(_norm, x, w, w)
    src, _ = render(lower(n))
    assert "_comb_sum_sum" in src and src.count("tl.reduce((") == 1, src


@pytest.mark.parametrize("target", ["cpu", "triton"])
@pytest.mark.parametrize("cols", [96, RBLOCK_MAX + 904])
def test_grouped_reductions_match_eager(target, cols):
    """Data far from zero (where the variance's correction matters), NaN in one row (amax keeps
    it), and a row longer than one Triton block (looped). Layer norm's input has unit spread: its
    output amplifies the input's own rounding by 1 / std."""
    torch.manual_seed(0)
    x = torch.randn(3, cols) * 0.01 + 1000
    x[1, 5] = float("nan")
    w, b = torch.randn(cols), torch.randn(cols)
    cases = ((_norm, (torch.randn(3, cols) + 100, w, b)), (_stats, (x,)), (lambda x: torch.var_mean(x, -1), (x,)))
    for fn, args in cases:
        torch._dynamo.reset()
        got, want = kiln.compile(fn, target=target)(*args), fn(*args)
        for g, e in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            torch.testing.assert_close(g, e, rtol=2e-5, atol=1e-4, equal_nan=True)


def test_mixed_kind_tuple_reduction_compiles_for_sm90():
    from test_triton_ptx import _model_jobs, _ptx
    jobs = _model_jobs(_stats, torch.randn(64, 256))
    assert any("_comb_" in j["source"] for j in jobs)
    assert len(_ptx(jobs)) == len(jobs)


def _looped_source(fn, *args) -> list[str]:
    return [render(lower(n))[0] for n in _groups(fn, *args)]


@pytest.fixture
def online(monkeypatch):
    import kiln.codegen.triton_gen as tg
    monkeypatch.setattr(tg, "ONLINE_SOFTMAX", True)


def test_looped_softmax_walks_each_row_twice(online):
    """Online softmax (schedule_stmts.online_softmax): the max and the sum of exponentials share
    one walk of a looped row, then the output walk; a row that fits keeps its one pass."""
    from kiln.codegen.schedule_stmts import online_softmax
    wide = torch.randn(4, RBLOCK_MAX + 904)
    for fn in (lambda x: torch.softmax(x, -1), lambda x: torch.log_softmax(x * 0.5, -1)):
        (n,) = _groups(fn, wide)
        lk = lower(n)
        _, stages, _ = plan_stages(lk)
        assert online_softmax(lk, stages) == {0: next(s.var for s in lk.stmts if getattr(s.expr, "op", None) == "sub")}
        (src,) = _looped_source(fn, wide)
        assert src.count("for r_start in range") == 2 and "_run = " in src
    # the max read again inside the sum's walk (x - m and x * m): no online pair
    (n,) = _groups(lambda x: (torch.exp(x - x.amax(-1, keepdim=True)) * x.amax(-1, keepdim=True)).sum(-1), wide)
    lk = lower(n)
    assert online_softmax(lk, plan_stages(lk)[1]) == {}


SPECIAL = {"softmax": (lambda x: torch.softmax(x, -1), torch.float32),
           "log_softmax": (lambda x: torch.log_softmax(x, -1), torch.float32),
           "logsumexp": (lambda x: torch.logsumexp(x, -1), torch.float32),
           "softmax_bf16": (lambda x: torch.softmax(x, -1), torch.bfloat16)}


@pytest.mark.parametrize("case", list(SPECIAL))
def test_online_softmax_matches_eager_on_special_rows(case, online):
    """Rows of -inf (NaN out, as eager), -inf prefixes longer than a block, NaN and +inf, a max
    that grows late in the row: against eager through the Triton interpreter and the cpu target
    (numba has no bf16: ATen runs that case there, so the interpreter alone checks it)."""
    fn, dtype = SPECIAL[case]
    torch.manual_seed(0)
    x = torch.randn(7, RBLOCK_MAX + 1000) * 4
    x[1, :] = float("-inf")
    x[2, 100:] = float("-inf")
    x[3, 5] = float("nan")
    x[4, 7000] = float("inf")
    x[5, :4000] = float("-inf")
    x[6, -1] = 60.0
    x = x.to(dtype)
    # bf16 out: one rounding apart at most (the interpreter truncates to bf16; a GPU rounds)
    tol = {"rtol": 1.6e-2, "atol": 1e-3} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    for target in ("triton", "cpu") if dtype == torch.float32 else ("triton",):
        torch._dynamo.reset()
        got, want = kiln.compile(fn, target=target)(x), fn(x)
        torch.testing.assert_close(got, want, equal_nan=True, **tol)


def test_online_softmax_compiles_for_sm90(online):
    from test_triton_ptx import _model_jobs, _ptx
    jobs = _model_jobs(lambda x, t: F.cross_entropy(x.float(), t),
                       torch.randn(8, RBLOCK_MAX + 904, dtype=torch.bfloat16), torch.randint(0, 100, (8,)))
    assert sum("_run = " in j["source"] for j in jobs) >= 1
    assert len(_ptx(jobs)) == len(jobs)

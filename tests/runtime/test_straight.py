"""The executor's steps as one generated function (runtime/straight.py) against the step loop it
replaces and against eager: inference and training graphs, multi-output ATen calls, kernels that
overwrite their input, an ``out=`` call that fails and becomes a plain call, and a dropped graph
freed without the cyclic collector."""
import gc
import weakref

import pytest
import torch

import kiln
from kiln.runtime import CompiledGraph, executor


@pytest.fixture(autouse=True)
def _straight(monkeypatch):
    """The generated function whatever KILN_STRAIGHT says (a test may switch it off itself)."""
    monkeypatch.setattr(executor, "STRAIGHT", True)


def _graphs(before: set) -> list:
    return [o for o in gc.get_objects() if not isinstance(o, weakref.ProxyType)
            and type(o) is CompiledGraph and id(o) not in before]


def _ids() -> set:
    return {id(o) for o in gc.get_objects() if not isinstance(o, weakref.ProxyType) and type(o) is CompiledGraph}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x):
        h = self.norm(self.a(x)).view(2, 4, 32).transpose(1, 2).softmax(-1)
        top, idx = h.max(-1)                           # a two-output ATen call
        y = self.b(h.transpose(1, 2).reshape(8, 32)).relu()
        return y * 2, top + idx.float()


@pytest.mark.parametrize("train", [False, True])
def test_generated_function_matches_the_step_loop_and_eager(train, monkeypatch):
    torch.manual_seed(0)
    m = Net()
    xs = [torch.randn(8, 16, requires_grad=train) for _ in range(3)]
    results = {}
    for straight in (False, True):
        monkeypatch.setattr(executor, "STRAIGHT", straight)
        torch._dynamo.reset()
        before = _ids()
        f = kiln.compile(m, target="cpu")
        got = []
        with torch.set_grad_enabled(train):
            for x in xs:
                out = f(x)
                if train:
                    grads = torch.autograd.grad(out[0].sum() + out[1].sum(), [x, *m.parameters()])
                    got.append([o.detach() for o in out] + list(grads))
                else:
                    got.append(list(out))
        results[straight] = got
        made = _graphs(before)
        assert made and all(bool(g._straight) == straight for g in made)
    with torch.set_grad_enabled(train):
        for x, a, b in zip(xs, results[False], results[True]):
            for p, q in zip(a, b):
                torch.testing.assert_close(q, p, rtol=0, atol=0)       # the same kernels, the same order
            want = m(x)
            torch.testing.assert_close(b[0], want[0].detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(b[1], want[1].detach(), rtol=1e-5, atol=1e-5)


def test_failing_out_call_becomes_a_plain_call():
    """An ``out=`` step whose call fails falls back to the plain op for good, and the generated
    function is written again without it."""
    torch.manual_seed(0)
    m = Net().eval()
    torch._dynamo.reset()
    before = _ids()
    f = kiln.compile(m, target="cpu")
    x = torch.randn(8, 16)
    with torch.no_grad():
        f(x)
        cg = _graphs(before)[0]
        k = next(i for i, s in enumerate(cg._steps) if s[0] == executor.OUT)
        mode, (node, fn), *rest = cg._steps[k]

        def broken(*a, **kw):
            raise RuntimeError("out= refused")
        cg._steps[k] = (mode, (node, broken), *rest)
        cg._straight.clear()
        for _ in range(2):
            torch.testing.assert_close(f(x), m(x))
        assert cg._steps[k][0] == executor.ATEN and cg._straight


def test_generated_function_holds_no_reference_to_its_graph():
    """The graph comes in as an argument: a reference from the function's globals (a bound
    method) would make a cycle, and a dropped graph's arena would wait for the cyclic collector."""
    torch.manual_seed(0)
    m = Net().eval()
    torch._dynamo.reset()
    before = _ids()
    f = kiln.compile(m, target="cpu")
    with torch.no_grad():
        f(torch.randn(8, 16))
    cg = _graphs(before)[0]
    (run, _views), = cg._straight.values()
    names = run.__globals__
    consts = names["C"]
    for r in gc.get_referrers(cg):
        assert r is not names and r is not consts
        assert not (getattr(r, "__self__", None) is cg and any(r == v for v in (*names.values(), *consts)))


@pytest.mark.parametrize("fn", [lambda x: (x * 2).sum(-1), lambda x: torch.softmax(x, -1) @ x.t()])
def test_generated_once(fn):
    """Written at the first call and kept, arena or not (a graph with no arena once got a new
    empty view dict every call, and its function was written again each time)."""
    torch._dynamo.reset()
    before = _ids()
    f = kiln.compile(fn, target="cpu")
    x = torch.randn(8, 16)
    f(x)
    cg, = _graphs(before)
    first = [r for r, _ in cg._straight.values()]
    for _ in range(3):
        torch.testing.assert_close(f(x), fn(x))
    assert [r for r, _ in cg._straight.values()] == first and len(first) == 1


def test_bad_switch_value_is_refused(monkeypatch):
    """KILN_STRAIGHT takes 0 or 1; anything else is one clear error at the first call, before any step."""
    monkeypatch.setattr(executor, "STRAIGHT", None)
    monkeypatch.setenv("KILN_STRAIGHT", "yes")
    torch._dynamo.reset()
    f = kiln.compile(lambda x: (x * 2).sum(-1), target="cpu")
    with pytest.raises(ValueError, match=r"KILN_STRAIGHT='yes': use 1 .* or 0"):
        f(torch.randn(4, 8))
    monkeypatch.setenv("KILN_STRAIGHT", "0")
    x = torch.randn(4, 8)
    torch.testing.assert_close(f(x), (x * 2).sum(-1))

"""Views of storage that outlives a call (weights, constants, the kept arena) are made once and
reused while their source is the same tensor at the same address; a weight given new storage
(``p.data = ...``) or a new input gets fresh views, and results always match eager."""
import gc
import weakref

import torch

import kiln
from kiln.runtime import CompiledGraph
from kiln.runtime.executor import VIEW


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        h = self.a(x).view(2, 4, 32).transpose(1, 2).softmax(-1)
        return self.b(h.transpose(1, 2).reshape(8, 32)).relu()


def _graph() -> CompiledGraph:
    return [o for o in gc.get_objects()
            if not isinstance(o, weakref.ProxyType) and type(o) is CompiledGraph][-1]


def _warm(calls: int):
    """A Block, compiled for the cpu target and called ``calls`` times against eager (under
    no_grad, which the caller keeps on); the model, its compiled form and its CompiledGraph."""
    torch.manual_seed(0)
    m = Block().eval()
    torch._dynamo.reset()
    f = kiln.compile(m, target="cpu")
    for _ in range(calls):
        x = torch.randn(8, 16)
        torch.testing.assert_close(f(x), m(x))
    return m, f, _graph()


def test_views_kept_while_sources_stay():
    with torch.no_grad():
        m, f, cg = _warm(2)
        kept = [i for i, s in enumerate(cg._steps) if s[0] is VIEW]
        assert kept, "no view of a weight or of the arena was found"
        before = [cg._kept[i][2] for i in kept]
        x = torch.randn(8, 16)
        torch.testing.assert_close(f(x), m(x))
        assert all(cg._kept[i][2] is v for i, v in zip(kept, before))     # reused, not remade
        m.a.weight.data = torch.randn(32, 16)                               # same Parameter, new storage
        m.b.weight.data = torch.randn(16, 32)
        torch.testing.assert_close(f(x), m(x))
        _sources_last(cg, m)


def _sources_last(cg: CompiledGraph, m: torch.nn.Module) -> None:
    """Every kept view's source is a weight, the kept arena's own view or another kept view:
    keeping a view of anything else would hold its memory between calls."""
    lasting = {id(p) for p in m.parameters()} | {id(t) for t in cg._consts.values()}
    lasting |= {id(v) for vs in cg._views.values() for v in vs.values()} if hasattr(cg, "_views") else set()
    lasting |= {id(k[2]) for k in cg._kept if k is not None}
    for k in cg._kept:
        if k is not None:
            assert id(k[0]) in lasting, f"kept a view of a tensor that does not last: {tuple(k[0].shape)}"


def test_fresh_arena_values_are_not_kept(monkeypatch):
    """An ATen op whose out= call fails returns a fresh tensor where its arena view would be;
    views of it are made every call, not kept (they would hold that tensor between calls)."""
    from kiln.ir.ops import resolve
    from kiln.runtime.executor import OUT

    def failed_out(self, k, views, env):
        _, (node, _), args, kwargs, _, _ = self._steps[k]
        return resolve(node.op)(*args(env), **kwargs(env))
    monkeypatch.setattr(CompiledGraph, "_run_out", failed_out)
    with torch.no_grad():
        m, f, cg = _warm(3)
        assert any(s[0] is OUT for s in cg._steps), "no out= step to fail"
        _sources_last(cg, m)


class Reshaped(torch.nn.Module):
    """A weight read through a reshape that must copy (its transpose is not viewable as 1-d)."""
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 4))

    def forward(self, x):
        return x * self.w.t().reshape(-1)


def test_copying_reshape_of_a_weight_is_not_kept():
    """The reshape's copy is made every call: after the weight changes in place (same storage,
    as an optimizer step does) the result still follows it."""
    torch._dynamo.reset()
    m = Reshaped()
    with torch.no_grad():
        f = kiln.compile(m, target="cpu")
        x = torch.randn(32)
        for _ in range(2):
            torch.testing.assert_close(f(x), m(x))
        m.w.mul_(-3.0)
        torch.testing.assert_close(f(x), m(x))


def test_new_weights_each_call_are_not_held():
    """A caller that passes new weight tensors on every call (functional style) gets fresh views
    and does not have the previous call's weights held by the graph."""
    torch.manual_seed(0)
    m = Block().eval()
    torch._dynamo.reset()
    with torch.no_grad():
        f = kiln.compile(m, target="cpu")
        x = torch.randn(8, 16)
        f(x)
        cg = _graph()
        names = [v.name for v in cg.graph.inputs]
        weights = set(cg.graph.meta.get("weight_inputs") or ())
        assert weights, "no weight inputs"
        gone = []
        for _ in range(3):
            ins = [torch.randn(v.type.shape) if v.name in weights else x for v in cg.graph.inputs]
            refs = [weakref.ref(t) for n, t in zip(names, ins) if n in weights]
            cg.run_list(list(ins))
            del ins
            gc.collect()
            gone.append(all(r() is None for r in refs))
        assert all(gone), "a previous call's weights are still held"

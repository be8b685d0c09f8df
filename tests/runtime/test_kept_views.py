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


def test_views_kept_while_sources_stay():
    torch.manual_seed(0)
    m = Block().eval()
    torch._dynamo.reset()
    with torch.no_grad():
        f = kiln.compile(m, target="cpu")
        for _ in range(2):
            x = torch.randn(8, 16)
            torch.testing.assert_close(f(x), m(x))
        cg = _graph()
        kept = [i for i, s in enumerate(cg._steps) if s[0] is VIEW]
        assert kept, "no view of a weight or of the arena was found"
        before = [cg._kept[i][2] for i in kept]
        x = torch.randn(8, 16)
        torch.testing.assert_close(f(x), m(x))
        assert all(cg._kept[i][2] is v for i, v in zip(kept, before))     # reused, not remade
        m.a.weight.data = torch.randn(32, 16)                               # same Parameter, new storage
        m.b.weight.data = torch.randn(16, 32)
        torch.testing.assert_close(f(x), m(x))

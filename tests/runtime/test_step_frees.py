"""A value the plan frees is released then: nothing in the executor keeps its tensor alive for
later steps. An H200 run caught the last ATen call's arguments held by a local variable until
the next ATen call, one whole activation above eager's peak in an MLP."""
import gc
import weakref

import pytest
import torch

import kiln
from kiln.runtime import CompiledGraph, executor
from models.mlp import ResidualMLP


@pytest.mark.parametrize("straight", [True, False])     # the generated step function, the step loop
def test_freed_activations_are_released(monkeypatch, straight):
    from kiln.passes import memory
    monkeypatch.setattr(executor, "STRAIGHT", straight)
    monkeypatch.setattr(executor, "out_variant", lambda op: None)     # matmuls as plain ATen calls
    monkeypatch.setattr(memory, "DYNAMIC_DEVICES", ("cuda", "cpu"))   # no arena: the GPU's plan
    monkeypatch.setattr(memory, "DYNAMIC_MARGIN", (0, 0.0))
    torch._dynamo.reset()
    m = ResidualMLP(64, 3).eval()
    with torch.no_grad():
        f = kiln.compile(m, target="cpu")
        x = torch.randn(32, 64)
        f(x)
        cg = [o for o in gc.get_objects() if not isinstance(o, weakref.ProxyType) and type(o) is CompiledGraph][-1]
        produced = {o[0] for s in cg._steps if s[0] == executor.KERNEL for o in s[4]}
        seen: dict[str, weakref.ref] = {}
        assert cg.plan.mode == "dynamic"
        arena = {v.untyped_storage().data_ptr() for vs in cg._views.values() for v in vs.values()}
        steps = list(cg._steps)
        aten = [k for k, s in enumerate(steps) if s[0] == executor.ATEN]
        assert aten, "no ATen step"
        for k in aten:
            mode, (node, fn, cloning), args, extra, outs, frees = steps[k]
            names = [a.name for a in node.args if hasattr(a, "name")]

            def spy(*a, _fn=fn, _names=names, **kw):
                for n, t in zip(_names, [t for t in a if isinstance(t, torch.Tensor)]):
                    if n in produced and t.untyped_storage().data_ptr() not in arena:
                        seen[n] = weakref.ref(t)       # (the kept arena's views live on: not these)
                return _fn(*a, **kw)
            steps[k] = (mode, (node, spy, cloning), args, extra, outs, frees)
        last = max(k for k, s in enumerate(steps) if s[0] == executor.KERNEL)
        kern = steps[last][1]
        live_at_last = set(steps[last][2])
        alive = []

        class Check:
            def launch(self, a, r):
                gc.collect()
                alive.extend(n for n, w in seen.items() if n not in live_at_last and w() is not None)
                kern.launch(a, r)
        steps[last] = (steps[last][0], Check()) + steps[last][2:]
        cg._steps = steps
        cg._straight.clear()            # written again over the spied steps
        out = f(x)
        torch.testing.assert_close(out, m(x))
        assert seen, "no activation reached an ATen call"
        assert not alive, f"freed activations still alive at the last step: {alive}"

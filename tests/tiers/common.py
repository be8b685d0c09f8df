"""Models and helpers for the tier tests: a stack of MLP blocks whose weights dwarf its
activations, graph capture through kiln's passes, and an independent plan checker."""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.ir import OpKind, op_kind


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.w2(F.gelu(self.w1(x)))


class Stack(nn.Module):
    """Weights ~ layers * 2 * d * h * 4 bytes; activations ~ batch * h * 4 bytes."""
    def __init__(self, d=64, h=128, layers=6):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(layers))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def stack(seed=0, **kw):
    torch.manual_seed(seed)
    m = Stack(**kw).eval()
    return m, (torch.randn(2, m.blocks[0].w1.in_features),)


def weight_bytes(m) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


def smallest_budget(exc: BaseException) -> int:
    """The budget a BudgetError (possibly wrapped by Dynamo) says would work."""
    m = re.search(r"use memory_budget >= (\d+)", str(exc))
    assert m, str(exc)
    return int(m.group(1))


def planned_graph(model, inputs, **options):
    """torch.export capture + kiln's passes (no codegen): the graph with its tier plan."""
    import kiln
    from kiln.ir.capture import capture_export
    from kiln.passes import run_pipeline
    with torch.no_grad():
        g = capture_export(model.eval(), inputs)
    return run_pipeline(g, kiln.Options.make(None, **options))[0]


def training_graphs(model, inputs=(), kwargs=None) -> list:
    """(kind, graph) of one training step under torch.compile (forward, then backward; loss =
    sum of the first output), with the weight inputs marked as kiln's backend marks them."""
    import kiln.api
    from kiln.ir.capture import dynamo_backend, from_fx
    graphs = []

    def backend(gm, ex):
        params = [i for i, x in enumerate(ex) if isinstance(x, torch.nn.Parameter)]
        pair: dict = {}

        def keep(fx, _, kind):
            g = from_fx(fx)
            kiln.api.mark_weight_inputs(g, kind, params, pair)
            graphs.append((kind, g))
            return fx.forward
        return dynamo_backend(keep)(gm, ex)

    torch._dynamo.reset()
    model.train()
    xs = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = torch.compile(model, backend=backend, dynamic=False)(*xs, **(kwargs or {}))
    out = out if isinstance(out, torch.Tensor) else out[0]
    out.float().sum().backward()
    torch._dynamo.reset()
    return graphs


def check_against_graph(g) -> None:
    """Independent of the planner's own problem: walk the nodes; every read of a planned
    weight, or of a view made of it, happens while one stay of that weight holds it, and a
    view is read inside the stay it was made in; the device never holds more than the budget."""
    problem, plan, budget = g.meta["tier_problem"], g.meta["tier_plan"], g.meta["tier_budget"]
    sizes = {it.name: -(-it.nbytes // 256) * 256 for it in problem.items}
    stays: dict[str, list] = {}
    for s in plan.stays:
        stays.setdefault(s.item, []).append(s)

    def stay_at(w, i):
        hits = [s for s in stays.get(w, []) if max(s.load, 0) <= i <= s.evict]
        assert len(hits) == 1, f"{w} has {len(hits)} stays covering step {i}"
        return hits[0]

    root = {w: (w, None) for w in sizes}          # value -> (weight, stay it was made in)
    for i, node in enumerate(g.nodes):
        for v in node.inputs():
            if v.name in root:
                w, made_in = root[v.name]
                s = stay_at(w, i)
                assert made_in is None or s is made_in, f"view {v.name} of {w} outlived its stay"
        if op_kind(node.op) == OpKind.VIEW and len(node.inputs()) == 1 and node.inputs()[0].name in root:
            w, _ = root[node.inputs()[0].name]
            for o in node.outputs:
                root[o.name] = (w, stay_at(w, i))
    occ = np.zeros(len(g.nodes), dtype=np.int64)
    for s in plan.stays:
        occ[max(s.load, 0):s.evict + 1] += sizes[s.item]
    assert occ.max(initial=0) + max(problem.fixed_bytes, default=0) <= budget

"""View motion before fusion: an unsqueeze of a pointwise result moves onto the op's operands, so
the op computes in the rank its consumer uses and can share that consumer's loop domain.

Why: fusion maps every value of a group onto one loop domain by aligning shapes from the right.
rotary's ``cat((-x2, x1), -1)`` reaches fusion as a ``where`` over the halves unsqueezed to
[..., 2, D/2] (ir/decompose.py::cat); ``-x2`` computed as [..., D/2] and unsqueezed afterwards
cannot say which domain dim its elements walk, while ``-(x2 unsqueezed)`` can."""
from __future__ import annotations

from kiln.ir import Graph, Node, OpKind, Value, infer, iter_values, map_values, op_kind

UNSQUEEZE = "aten.unsqueeze.default"


def hoist_unsqueeze(g: Graph, options=None) -> Graph:
    """Pipeline pass: ``unsqueeze(op(a, b, ...), d)`` -> ``op(unsqueeze(a, d), unsqueeze(b, d), ...)``
    where ``op`` is pointwise, its result has no other use and does not escape, and its tensor
    operands all have the result's shape (no broadcasting to re-align). Repeated up chains."""
    names = g.fresh_namer("hoisted")
    escaping = {v.name for v in g.output_values()}
    nodes = list(g.nodes)
    for _ in range(16):
        users: dict[str, int] = {}
        for n in nodes:
            for v in n.inputs():
                users[v.name] = users.get(v.name, 0) + 1
        producer = {v.name: n for n in nodes for v in n.outputs}
        swap: dict[int, list[Node]] = {}
        gone: set[int] = set()
        for n in nodes:
            src = n.args[0] if n.op == UNSQUEEZE and n.args else None
            p = producer.get(src.name) if isinstance(src, Value) else None
            if p is None or id(p) in gone or op_kind(p.op) != OpKind.POINTWISE or len(p.outputs) != 1 \
                    or users.get(src.name) != 1 or src.name in escaping or p.attrs \
                    or any(True for _ in iter_values(p.kwargs)):
                continue
            operands = list(dict.fromkeys(v.name for v in iter_values(p.args)))
            by_name = {v.name: v for v in iter_values(p.args)}
            if not operands or any(by_name[a].type is None or by_name[a].type.shape != src.type.shape
                                   for a in operands):
                continue
            pre, moved = [], {}
            for a in operands:
                t = infer(UNSQUEEZE, (by_name[a], n.args[1]), {})[0]
                moved[a] = Value(next(names), t)
                pre.append(Node(UNSQUEEZE, (by_name[a], n.args[1]), {}, [moved[a]]))
            args = map_values(p.args, lambda v: moved.get(v.name, v))
            t = infer(p.op, args, dict(p.kwargs))[0]
            if t is None or t.shape != n.out.type.shape or t.dtype != n.out.type.dtype:
                continue
            swap[id(n)] = [*pre, Node(p.op, args, dict(p.kwargs), [n.outputs[0]])]
            gone.add(id(p))
        if not swap:
            break
        nodes = [m for n in nodes if id(n) not in gone for m in swap.get(id(n), [n])]
    return g if nodes == list(g.nodes) else g.copy(nodes)

"""Bias back into the matmul on the CPU: ``mm(a, b) * alpha + bias * beta`` -> ``addmm``.

Capture decomposes addmm into mm, scalings and an add (ir/decompose.py) so that on a GPU the
bias and what follows become the matmul's epilogue. The cpu target keeps ATen's matmuls, where
the decomposition only costs a pointwise kernel re-reading the whole product; BLAS adds the
bias as it writes the product (eager's addmm is no slower than its mm). So on the cpu target,
before fusion, a product read only by such an add becomes one addmm again."""
from __future__ import annotations

import numbers

from kiln.ir import Graph, Node, Value


def _scaled(v, prod: dict[str, Node], users: dict[str, int]) -> tuple[Value, float, Node | None]:
    """(x, c, mul node) for v = x * c with a Python number c read by nothing else, else (v, 1, None)."""
    n = prod.get(v.name) if isinstance(v, Value) else None
    if n is not None and n.op in ("aten.mul.Tensor", "aten.mul.Scalar") and users.get(v.name) == 1 \
            and isinstance(n.args[0], Value) and isinstance(n.args[1], numbers.Number) \
            and not isinstance(n.args[1], bool) and n.args[0].type is not None \
            and n.args[0].type.dtype == v.type.dtype and n.args[0].type.shape == v.type.shape:
        return n.args[0], float(n.args[1]), n
    return v, 1.0, None


def recompose_addmm(g: Graph, options=None) -> Graph:
    """Pipeline pass (cpu target only)."""
    if options is None or options.resolved_target() != "cpu":
        return g
    prod = {v.name: n for n in g.nodes for v in n.outputs}
    users: dict[str, int] = {}
    for n in g.nodes:
        for v in n.inputs():
            users[v.name] = users.get(v.name, 0) + 1
    for v in g.output_values():
        users[v.name] = users.get(v.name, 0) + 1
    replace: dict[int, Node] = {}
    dead: set[int] = set()
    for n in g.nodes:
        if n.op != "aten.add.Tensor" or len(n.args) != 2 or n.kwargs or n.out.type is None \
                or not all(isinstance(a, Value) and a.type is not None for a in n.args):
            continue
        for i in (0, 1):
            p, alpha, pmul = _scaled(n.args[i], prod, users)
            bias, beta, bmul = _scaled(n.args[1 - i], prod, users)
            mm = prod.get(p.name)
            if mm is None or mm.op != "aten.mm.default" or users.get(p.name) != 1 or id(mm) in dead:
                continue
            t, bt = n.out.type, bias.type
            if t.shape != p.type.shape or t.dtype != p.type.dtype or bt.dtype != t.dtype \
                    or t.dtype.is_complex or not t.dtype.is_floating_point \
                    or bt.shape not in (t.shape, t.shape[-1:], (1, t.shape[-1])):
                continue
            kw = {k: c for k, c in (("beta", beta), ("alpha", alpha)) if c != 1.0}
            replace[id(n)] = Node("aten.addmm.default", (bias, *mm.args[:2]), kw, [n.out])
            dead |= {id(mm)} | {id(m) for m in (pmul, bmul) if m is not None}
            break
    if not replace:
        return g
    return g.copy([replace.get(id(n), n) for n in g.nodes if id(n) not in dead])

"""Gathers move ahead of the pointwise ops that feed them: ``gather(op(a, b), d, i)`` becomes
``op(gather(a, d, i), gather(b, d, i))``, computed on the few elements picked instead of the
whole tensor.

Why: a cross-entropy loss reaches kiln as ``nll_loss(log_softmax(x), t)``, a gather of one
element per row out of the whole log-softmax, which was written to memory only to be read back
at ``t`` (4096 x 50257 logits: 823 MB of fp32 written and read for a 16 KB result). After the
move, the log-softmax's subtraction runs on the picked logits and its row statistics (max and
log-sum-exp), and nothing of the size of the logits is written.

An operand broadcast to the op's shape is expanded first (a view), so the gather picks the
element the op would have read; one broadcast along the gathered dim (a row statistic) needs no
gather at all. When the op's full result has other uses it is computed again on the picked
elements, but only when they are at most an eighth of it; random ops never move (their draws
depend on the shape).

``x[torch.arange(N), t]`` on a 2-D ``x`` (one pick a row, as hand-written losses and token
log-probabilities index) is first written as the gather it is, negative picks counted from the end
as indexing counts them."""
from __future__ import annotations

import torch

from kiln.ir import Graph, Node, OpKind, Value, infer, iter_values, map_values, op_kind
from kiln.ir.ops import is_random

from .gather import arange_of

GATHER = "aten.gather.default"
EXPAND = "aten.expand.default"
SHARE = 8       # an op with other uses is recomputed on at most 1/SHARE of its elements


class Untyped(Exception):
    """A rewrite step whose result type does not infer: the rewrite is given up."""


def emit(out: list[Node], names, op: str, args: tuple, kwargs: dict | None = None, value: Value | None = None) -> Value:
    """Append ``op(*args, **kwargs)`` to ``out`` as a node writing ``value`` (else a fresh value of
    the inferred type) and return what it writes; raises Untyped when the type does not infer."""
    ty = infer(op, args, kwargs or {})[0]
    if ty is None:
        raise Untyped(op)
    out.append(Node(op, args, kwargs or {}, [value or Value(next(names), ty)]))
    return out[-1].outputs[0]


def sink_gather(g: Graph, options=None) -> Graph:
    """Pipeline pass (see the module docstring); repeated up chains of pointwise ops."""
    names = g.fresh_namer("gathered")
    escaping = {v.name for v in g.output_values()}
    producers = {v.name: n for n in g.nodes for v in n.outputs}
    nodes = [m for n in g.nodes for m in (_row_picks(g, n, producers, names) or [n])]
    for _ in range(256):            # one move a round: each changes the users the next one sees
        users: dict[str, int] = {}
        for n in nodes:
            for v in n.inputs():
                users[v.name] = users.get(v.name, 0) + 1
        producer = {v.name: n for n in nodes for v in n.outputs}
        for n in nodes:
            new = _sink(n, producer, users, escaping, names)
            if new is not None:
                i = nodes.index(n)
                nodes[i:i + 1] = new
                break
        else:
            break
    return g if nodes == list(g.nodes) else g.copy(nodes)


def _sink(n: Node, producer: dict, users: dict, escaping: set, names) -> list[Node] | None:
    if n.op != GATHER or len(n.args) < 3 or any(v for k, v in n.kwargs.items() if k != "sparse_grad"):
        return None
    src, dim, idx = n.args[:3]
    p = producer.get(src.name) if isinstance(src, Value) else None
    if p is None or op_kind(p.op) != OpKind.POINTWISE or len(p.outputs) != 1 or p.attrs or is_random(p.op) \
            or any(True for _ in iter_values(p.kwargs)) or src.type is None or n.out.type is None:
        return None
    alone = users.get(src.name) == 1 and src.name not in escaping
    if not alone and n.out.type.numel * SHARE > src.type.numel:
        return None
    pre, moved = [], {}
    for a in dict.fromkeys(v for v in iter_values(p.args)):
        if a.type is None or a.type.rank == 0:          # a 0-d operand broadcasts as it is
            continue
        if _constant_along(a, src, dim, idx):      # every pick reads the one element: a view
            e_args = (a, list(n.out.type.shape))
            t = infer(EXPAND, e_args, {})[0]
            if t is None or t.shape != n.out.type.shape:
                return None
            moved[a.name] = Value(next(names), t)
            pre.append(Node(EXPAND, e_args, {}, [moved[a.name]]))
            continue
        base = a
        if a.type.shape != src.type.shape:
            e_args = (a, list(src.type.shape))
            t = infer(EXPAND, e_args, {})[0]
            if t is None or t.shape != src.type.shape:
                return None
            base = Value(next(names), t)
            pre.append(Node(EXPAND, e_args, {}, [base]))
        g_args = (base, dim, idx)
        t = infer(GATHER, g_args, {})[0]
        if t is None or t.shape != n.out.type.shape:
            return None
        moved[a.name] = Value(next(names), t)
        pre.append(Node(GATHER, g_args, {}, [moved[a.name]]))
    args = map_values(p.args, lambda v: moved.get(v.name, v))
    t = infer(p.op, args, dict(p.kwargs))[0]
    if t is None or t.shape != n.out.type.shape or t.dtype != n.out.type.dtype:
        return None
    return [*pre, Node(p.op, args, dict(p.kwargs), [n.outputs[0]])]


def _constant_along(a: Value, src: Value, dim: int, idx: Value) -> bool:
    """Is operand ``a`` broadcast along the gathered dim, with the index as large as the source
    on every other dim? Then the gather picks ``a`` itself, expanded to the index's shape."""
    r = src.type.rank
    shape = [1] * (r - a.type.rank) + list(a.type.shape)
    d = dim % r if isinstance(dim, int) and r else None
    return d is not None and idx.type is not None and idx.type.rank == r and shape[d] == 1 and all(
        idx.type.shape[k] == src.type.shape[k] for k in range(r) if k != d)


INDEX = "aten.index.Tensor"


def _row_picks(g: Graph, n: Node, producers: dict, names) -> list[Node] | None:
    """``index(x, [arange(N), t])`` with x [N, V] and t [N] as ``gather(x, 1, t')`` squeezed, where
    t' counts negative picks from the end (an out-of-range pick still fails, as indexing does)."""
    if n.op != INDEX or len(n.args) != 2 or n.kwargs or n.out.type is None:
        return None
    x, idx = n.args
    if not isinstance(x, Value) or x.type is None or x.type.rank != 2 or not isinstance(idx, (list, tuple)) \
            or len(idx) != 2 or not all(isinstance(i, Value) and i.type is not None for i in idx):
        return None
    rows, t = idx
    n_rows, width = x.type.shape
    if t.type.shape != (n_rows,) or t.type.dtype not in (torch.int32, torch.int64) \
            or arange_of(g, rows, producers) != range(n_rows):
        return None
    out: list[Node] = []
    try:
        neg = emit(out, names, "aten.lt.Scalar", (t, 0))
        wrapped = emit(out, names, "aten.add.Tensor", (t, width))
        col = emit(out, names, "aten.unsqueeze.default", (emit(out, names, "aten.where.self", (neg, wrapped, t)), 1))
        got = emit(out, names, GATHER, (x, 1, col))
        if got.type.shape != (n_rows, 1) or n.out.type.shape != (n_rows,):
            return None
        emit(out, names, "aten.squeeze.dims", (got, [1]), value=n.outputs[0])
    except Untyped:
        return None
    return out

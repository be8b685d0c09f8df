"""The gather pass: ``aten.embedding`` (a row gather from a 2-D weight) becomes a ``kiln.gather``
kernel node, so a model's embeddings run as generated kernels rather than ATen calls. Its
backward (``aten.embedding_dense_backward``, a scatter-add) stays ATen.

Rows picked by an ``arange`` known at compile time (position embeddings: ``wpe(arange(S))``) are
a slice of the weight: a view, no kernel, and no index tensor (a folded arange constant is a
block of device memory held for good)."""
from __future__ import annotations

import torch

from kiln.ir import Graph, Node, Value, infer, map_values

from .cleanup import dce

OP = "aten.embedding.default"
KERNEL = "kiln.gather"
_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
           torch.int16, torch.int32, torch.int64, torch.bool}


def _gatherable(n: Node) -> bool:
    w, idx = n.args[0], n.args[1]
    out = n.outputs[0].type if len(n.outputs) == 1 else None
    return (out is not None and w.type is not None and idx.type is not None and w.type.rank == 2
            and w.type.dtype in _DTYPES and idx.type.dtype in (torch.int32, torch.int64)
            and out.is_contiguous and w.type.device == idx.type.device)


ARANGE = {"aten.arange.default": ("end",), "aten.arange.start": ("start", "end"),
          "aten.arange.start_step": ("start", "end", "step")}
SAME_ELEMENTS = ("aten.unsqueeze.default", "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")


def arange_of(g: Graph, idx: Value, producers: dict) -> range | None:
    """The indices ``idx`` holds when they are a compile-time arange (a folded constant, or an
    ``aten.arange`` node with integer bounds, through views that keep the element order)."""
    v = idx
    while v.name in producers and producers[v.name].op in SAME_ELEMENTS:
        v = producers[v.name].args[0]
        if not isinstance(v, Value):
            return None
    p = producers.get(v.name)
    if p is not None and p.op in ARANGE:
        bounds = dict(zip(ARANGE[p.op], p.args))
        if not all(isinstance(b, int) for b in bounds.values()):
            return None
        r = range(bounds.get("start", 0), bounds["end"], bounds.get("step", 1))
    elif v.name in g.constants and isinstance(g.constants[v.name], torch.Tensor):
        t = g.constants[v.name].flatten()
        if t.numel() == 0 or t.dtype not in (torch.int32, torch.int64):
            return None
        first, step = int(t[0]), int(t[1] - t[0]) if t.numel() > 1 else 1
        r = range(first, first + step * t.numel(), step) if step > 0 else None
        if r is None or not torch.equal(t, torch.arange(r.start, r.stop, r.step, dtype=t.dtype, device=t.device)):
            return None
    else:
        return None
    return r if idx.type is not None and len(r) == idx.type.numel else None


def _rows_slice(n: Node, rows: range, names) -> list[Node] | None:
    """``embedding(w, arange)`` as ``w[start:stop:step]`` viewed to the output's shape, where
    every index is a row of ``w`` (eager would raise for one that is not; a slice would clamp)."""
    w, out = n.args[0], n.outputs[0]
    if not rows or rows.step < 1 or rows.start < 0 or rows[-1] >= w.type.shape[0]:
        return None
    sl = (w, 0, rows.start, rows[-1] + 1, rows.step)
    t_sl = infer("aten.slice.Tensor", sl, {})[0]
    sv = Value(next(names), t_sl)
    shape = list(out.type.shape)
    t_out = infer("aten.view.default", (sv, shape), {})[0]
    if t_out is None or t_out.shape != out.type.shape or t_out.dtype != out.type.dtype:
        return None
    return [Node("aten.slice.Tensor", sl, {}, [sv]), Node("aten.view.default", (sv, shape), {}, [Value(next(names), t_out)])]


def gather_rows(g: Graph, options=None) -> Graph:
    """Pipeline pass. padding_idx and scale_grad_by_freq change only the backward."""
    nodes, changed = [], False
    producers, escaping, names = g.producers(), {v.name for v in g.output_values()}, g.fresh_namer("rows")
    renamed: dict[str, Value] = {}
    for n in g.nodes:
        if renamed:
            n = Node(n.op, map_values(n.args, lambda v: renamed.get(v.name, v)),
                     map_values(n.kwargs, lambda v: renamed.get(v.name, v)), n.outputs, n.attrs)
        rows = arange_of(g, n.args[1], producers) if n.op == OP and _gatherable(n) else None
        view = _rows_slice(n, rows, names) if rows is not None and n.outputs[0].name not in escaping else None
        if view is not None:
            nodes.extend(view)
            renamed[n.outputs[0].name] = view[-1].outputs[0]
            changed = True
        elif n.op == OP and _gatherable(n):
            nodes.append(Node(KERNEL, (n.args[0], n.args[1]), {}, list(n.outputs),
                              {"name": f"gather_{n.outputs[0].name}", "ops": [OP]}))
            changed = True
        else:
            nodes.append(n)
    if renamed:        # the arange and its folded constant may be read by nothing now
        return dce(g.copy(nodes))
    return g.copy(nodes) if changed else g

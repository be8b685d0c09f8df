"""Kernel inputs that are ``arange``s: computed from the element's index in the kernel, not loaded.

An integer tensor whose every element equals its own storage position (``arange(n)``, or any
view of one: unsqueezed, expanded, reshaped, sliced) holds nothing a kernel could not compute:
the element the kernel would load at address ``offset + sum(i_d * stride_d)`` is that number.
This pass records, on each fused kernel node, which inputs are such tensors and their storage
offset (``attrs["iota"]``: [input position, offset] pairs); the renderers then emit the address
expression in place of the load (codegen/lower.py ``Access.iota``).

Why: a cross-entropy's backward compares every column index with the row's target
(passes/one_hot.py) and read the column indices from an int64 ``arange`` of the vocabulary: eight
bytes per element, twice per row (the row sum, then the update), from L2. Position ids and masks
made from ``arange`` comparisons read the same way.

Found two ways: a node chain ``arange(0, n, 1)`` -> views (the arange left to run: past the
constant folder's size limit, or made by a later pass), and a graph constant whose values are
its storage positions (a small arange, folded). The input itself stays an argument (its tensor is
passed, never read)."""
from __future__ import annotations

from dataclasses import replace

import torch

from kiln.ir import Graph, Value

ARANGES = {"aten.arange.default", "aten.arange.start", "aten.arange.start_step"}
# views whose IR strides and offset say where each element sits in the source's storage
VIEWS = {"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.unsqueeze.default",
         "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default", "aten.expand.default",
         "aten.alias.default", "aten.slice.Tensor", "aten.select.int", "aten.permute.default",
         "aten.t.default", "aten.transpose.int"}
INTEGER = {torch.int16, torch.int32, torch.int64}
CONST_CHECK_MAX = 1 << 16       # elements: a folded constant is compared with its positions


def _arange_node(n) -> bool:
    """An arange whose element i is i: start 0, step 1, an integer dtype."""
    if n.op not in ARANGES or n.out.type is None or n.out.type.dtype not in INTEGER:
        return False
    a = list(n.args) + [None] * 3
    start = 0 if n.op == "aten.arange.default" else a[0]
    step = a[2] if n.op == "aten.arange.start_step" and a[2] is not None else n.kwargs.get("step", 1)
    return start == 0 and step == 1 and n.out.type.offset == 0 and n.out.type.strides in ((1,), ())


def _positions(t: torch.Tensor) -> bool:
    """Does every element of the constant equal its storage position?"""
    if t.dtype not in INTEGER or t.numel() < 2 or t.numel() > CONST_CHECK_MAX:     # not a 0-d zero
        return False
    span = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1
    if span > 16 * CONST_CHECK_MAX:
        return False
    want = torch.arange(span, dtype=t.dtype).as_strided(t.shape, t.stride(), t.storage_offset())
    return torch.equal(t.cpu(), want)


def _source_is_arange(v: Value, producers: dict, consts: dict) -> bool:
    seen = 0
    while seen < 16:
        if v.name in consts:        # the kernel computes from the IR's layout: it must be the tensor's
            t = consts[v.name]
            return isinstance(t, torch.Tensor) and v.type is not None and tuple(t.stride()) == v.type.strides \
                and t.storage_offset() == v.type.offset and _positions(t)
        n = producers.get(v.name)
        if n is None:
            return False
        if _arange_node(n):
            return True
        src = n.args[0] if n.args else None
        if n.op not in VIEWS or not isinstance(src, Value) or src.type is None:
            return False
        if n.op in ("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default") \
                and not src.type.is_contiguous:
            return False        # a reshape that would copy
        v, seen = src, seen + 1
    return False


def mark_iota(g: Graph) -> Graph:
    """Pipeline pass (see the module docstring)."""
    producers = {v.name: n for n in g.nodes for v in n.outputs}
    consts = g.constants
    changed = False
    nodes = []
    for n in g.nodes:
        if n.op == "kiln.fused":
            iota = [[i, a.type.offset] for i, a in enumerate(n.args)
                    if isinstance(a, Value) and a.type is not None and a.type.dtype in INTEGER
                    and _source_is_arange(a, producers, consts)]
            if iota != n.attrs.get("iota", []):
                n = replace(n, attrs={**n.attrs, "iota": iota})
                changed = True
        nodes.append(n)
    return g.copy(nodes) if changed else g

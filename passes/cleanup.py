"""Cleanup passes: dead-code elimination, common-subexpression elimination, constant folding,
view canonicalisation, and (after fusion) kernels that only copy. Each is a plain Graph -> Graph
function."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import _disable_current_modes

from kiln.ir import Graph, Node, Value, map_values, op_kind, OpKind, resolve
from kiln.ir.ops import is_random


def _side_effect(n: Node) -> bool:
    if n.op.startswith("py."):
        return True
    try:
        return resolve(n.op)._schema.is_mutable
    except KeyError:
        return True


def dce(g: Graph) -> Graph:
    """Drops nodes whose outputs nothing reads (side effects kept), and constants nothing reads
    (the runtime would hold their tensors)."""
    live = {v.name for v in g.output_values()}
    keep = []
    for n in reversed(g.nodes):
        if _side_effect(n) or any(v.name in live for v in n.outputs):
            keep.append(n)
            live.update(v.name for v in n.inputs())
    g2 = g.copy(list(reversed(keep)))
    if any(v.name not in live for v in g.constant_values):
        g2.constant_values = [v for v in g.constant_values if v.name in live]
        g2.constants = {v.name: g.constants[v.name] for v in g2.constant_values}
    return g2


def _key(obj):
    if isinstance(obj, Value):
        return ("%", obj.name)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(_key(o) for o in obj))
    if isinstance(obj, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in obj.items())))
    if isinstance(obj, float):
        return ("f", repr(obj))
    return (type(obj).__name__, repr(obj))


def cse(g: Graph) -> Graph:
    seen: dict = {}
    rename: dict[str, Value] = {}
    out = []
    sub = lambda v: rename.get(v.name, v)  # noqa: E731
    for n in g.nodes:
        n = Node(n.op, map_values(n.args, sub), map_values(n.kwargs, sub), n.outputs, n.attrs)
        if _side_effect(n) or is_random(n.op) or n.attrs:
            out.append(n)
            continue
        k = (n.op, _key(n.args), _key(n.kwargs))
        if k in seen:
            for a, b in zip(n.outputs, seen[k].outputs):
                rename[a.name] = b
            continue
        seen[k] = n
        out.append(n)
    g2 = g.copy(out)
    g2.outputs = map_values(g.outputs, sub)
    return g2


# deterministic tensor factories: with no tensor inputs, their results are constants too
FACTORIES = {"aten.arange.default", "aten.arange.start", "aten.arange.start_step", "aten.full.default",
             "aten.scalar_tensor.default", "aten.zeros.default", "aten.ones.default", "aten.eye.default"}


# A folded value is held by the compiled graph for good, where eager makes it per call and frees
# it. A uniform fill costs a kernel nothing to make where it is read, so only fills within one
# block of the CUDA caching allocator (512 bytes) fold: a backward's zero-filled gradient buffers
# (index_put's and slice_scatter's targets) did fold at 64 KiB and put the zoo's training steps
# above eager's peak (bench/RESULTS.md, seventh session). Other values (positions, masks) fold
# up to 64 KiB.
FILLS = {"aten.full.default", "aten.zeros.default", "aten.ones.default", "aten.scalar_tensor.default"}
FILL_MAX_BYTES = 512
FOLD_MAX_BYTES = 1 << 16


def constant_fold(g: Graph, max_bytes: int = FOLD_MAX_BYTES) -> Graph:
    """Evaluate nodes whose inputs are all compile-time constants (and small) once, now.
    Graph outputs are left to run: eager returns a fresh tensor on every call."""
    consts = dict(g.constants)
    cvals = list(g.constant_values)
    outputs = {v.name for v in g.output_values()}
    out = []
    for n in g.nodes:
        ins = n.inputs()
        foldable = ((all(v.name in consts for v in ins) if ins else n.op in FACTORIES)
                    and not _side_effect(n) and not is_random(n.op) and not n.attrs
                    and (op_kind(n.op) != OpKind.OPAQUE or n.op in FACTORIES)
                    and all(v.type is not None and v.name not in outputs
                            and v.type.nbytes <= (FILL_MAX_BYTES if n.op in FILLS else max_bytes)
                            for v in n.outputs))
        if not foldable:
            out.append(n)
            continue
        # the compile may run under a tracing mode (AOTAutograd calls its compilers inside
        # FakeTensorMode): fold on real tensors, or a fake constant reaches the runtime
        with _disable_current_modes():
            res = resolve(n.op)(*map_values(n.args, lambda v: consts[v.name]),
                                **map_values(n.kwargs, lambda v: consts[v.name]))
        res = res if isinstance(res, (tuple, list)) else (res,)
        for v, t in zip(n.outputs, res):
            consts[v.name] = t
            cvals.append(v)
    g2 = g.copy(out)
    used = {v.name for n in out for v in n.inputs()} | {v.name for v in g.output_values()}
    g2.constant_values = [v for v in cvals if v.name in used]
    g2.constants = {v.name: consts[v.name] for v in g2.constant_values}
    return g2


_IDENTITY_VIEWS = {"aten.alias.default", "aten.detach.default"}


def _same_layout(src, dst) -> bool:
    return src is not None and dst is not None and \
        (src.shape, src.strides, src.offset, src.dtype) == (dst.shape, dst.strides, dst.offset, dst.dtype)


def _alias_away(g: Graph, alias_of) -> Graph:
    """``g`` without the nodes for which ``alias_of(node)`` names the value their output equals;
    readers of the output (graph outputs included) read that value instead."""
    rename: dict[str, Value] = {}
    sub = lambda v: rename.get(v.name, v)  # noqa: E731
    kept = []
    for n in g.nodes:
        n = Node(n.op, map_values(n.args, sub), map_values(n.kwargs, sub), n.outputs, n.attrs)
        src = alias_of(n)
        if src is not None:
            rename[n.out.name] = src
        else:
            kept.append(n)
    g2 = g.copy(kept)
    g2.outputs = map_values(g.outputs, sub)
    return g2


def canonicalize_views(g: Graph) -> Graph:
    """Drop identity views (alias, detach, reshapes/expands to the same shape) and merge
    view-of-view chains into one view where the result is the same."""
    def alias_of(n: Node) -> Value | None:
        if op_kind(n.op) == OpKind.VIEW and n.args and isinstance(n.args[0], Value) and \
                (n.op in _IDENTITY_VIEWS or _same_layout(n.args[0].type, n.out.type)):
            return n.args[0]
        return None
    return _alias_away(g, alias_of)


# op -> the scalar that leaves its first operand unchanged, exactly (x * 1, x / 1, x - 0 are
# bit-identical for every float, NaN and -0.0 included; x + 0 is not: -0.0 + 0 is +0.0)
_IDENTITY_SCALARS = {"aten.mul.Tensor": 1, "aten.mul.Scalar": 1, "aten.div.Tensor": 1, "aten.div.Scalar": 1,
                     "aten.sub.Tensor": 0, "aten.sub.Scalar": 0}


def _identity(n: Node) -> Value | None:
    """The operand an exact identity op returns unchanged (same dtype, shape and layout), or None."""
    ident = _IDENTITY_SCALARS.get(n.op)
    if ident is None or len(n.args) != 2 or n.kwargs or not isinstance(n.args[0], Value) \
            or not isinstance(n.args[1], (int, float)) or isinstance(n.args[1], bool) or n.args[1] != ident:
        return None
    return n.args[0] if _same_layout(n.args[0].type, n.out.type) else None


def drop_copy_kernels(g: Graph) -> Graph:
    """Drop fused kernels whose only work is an exact identity (``grad * 1``, left by
    decompositions such as addmm's backward with alpha 1): such a kernel copies a tensor, as
    big as a gradient, to no end. An identity fused with real work costs nothing and stays. Not
    for graph outputs (eager returns a new tensor there, not an alias)."""
    outs = {v.name for v in g.output_values()}

    def alias_of(n: Node) -> Value | None:
        body = n.attrs.get("body") if n.op == "kiln.fused" else None
        if body is None or len(body.nodes) != 1 or len(n.outputs) != 1 or n.out.name in outs:
            return None
        src = _identity(body.nodes[0])
        inner = {v.name: a for v, a in zip(body.inputs, n.args)}.get(src.name) if src is not None else None
        return inner if isinstance(inner, Value) and inner.type == n.out.type else None
    return _alias_away(g, alias_of)


def split_fills(g: Graph) -> Graph:
    """Give each pointwise or reduction reader of a uniform fill (zeros, ones, full) its own copy
    of the fill, placed just before it. Fusion then makes the fill inside each reader's kernel;
    one shared fill would be stored by the first reader's kernel as an output and held until the
    last reader (GPT-2's backward kept a zero [B, S, 3, H, D] gradient buffer across a layer).
    Readers that are not generated kernels (index_put, as_strided_scatter) share the original."""
    fills = {n.out.name: n for n in g.nodes if n.op in FILLS and not n.inputs() and len(n.outputs) == 1
             and n.out.type is not None and n.out.type.rank}
    escaping = {v.name for v in g.output_values()}
    fills = {k: n for k, n in fills.items() if k not in escaping}
    if not fills:
        return g
    names = g.fresh_namer("fill")
    seen: set[str] = set()
    out: list[Node] = []
    for n in g.nodes:
        kind = op_kind(n.op)
        mine = {}
        if kind in (OpKind.POINTWISE, OpKind.REDUCTION):
            for v in n.inputs():
                if v.name in fills and v.name in seen and v.name not in mine:
                    f = fills[v.name]
                    mine[v.name] = Value(next(names), v.type)
                    out.append(Node(f.op, f.args, dict(f.kwargs), [mine[v.name]], dict(f.attrs)))
        if len(n.outputs) == 1 and n.out.name in fills:
            seen.add(n.out.name)
        out.append(Node(n.op, map_values(n.args, lambda v: mine.get(v.name, v)),
                        map_values(n.kwargs, lambda v: mine.get(v.name, v)), n.outputs, n.attrs) if mine else n)
    return dce(g.copy(out))

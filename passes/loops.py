"""Iteration-space analysis of a fusion group: the loop domain, the reduced dims, and for every
value in the group which domain dim each of its dims walks (its ``dim map``; None for a size-1,
broadcast dim). A group is legal exactly when this analysis succeeds; the result is recorded on
the fused node so code generators render it without deciding anything."""
from __future__ import annotations

from kiln.ir import Graph, Node, OpKind, Value, op_kind
from kiln.ir.scalar import NotLowerable, lower_pointwise, reduction_spec

DimMap = tuple


class NotFusible(Exception):
    pass


def _right_align(shape, dmap_out, out_shape) -> DimMap:
    """Dim map of an operand broadcast (numpy rules) against an output with map ``dmap_out``."""
    off = len(out_shape) - len(shape)
    return tuple(dmap_out[off + i] if shape[i] == out_shape[off + i] and shape[i] != 1 else None
                 for i in range(len(shape)))


def _default_map(shape, domain) -> DimMap:
    """Right-aligned; extra leading dims are fine when they have size 1 (an unsqueeze)."""
    off = len(domain) - len(shape)
    out = []
    for i, s in enumerate(shape):
        if s == 1:
            out.append(None)
        elif off + i >= 0 and domain[off + i] == s:
            out.append(off + i)
        else:
            raise NotFusible(f"shape {shape} does not broadcast to domain {domain}")
    return tuple(out)


def _view_map(node: Node, m: DimMap, domain) -> DimMap:
    src, dst = node.args[0].type.shape, node.out.type.shape
    op = node.op
    if op == "aten.permute.default":
        return tuple(m[d % len(src)] for d in node.args[1])
    if op in ("aten.expand.default",):
        off = len(dst) - len(src)
        out = list(_default_map(dst, domain))
        for i in range(len(src)):
            if src[i] != 1:
                out[off + i] = m[i]
        return tuple(out)
    # unsqueeze / squeeze / view / reshape that only add or drop size-1 dims
    if [s for s in src if s != 1] != [s for s in dst if s != 1]:
        raise NotFusible(f"{op} reshapes {src} -> {dst}")
    kept = iter([md for s, md in zip(src, m) if s != 1])
    return tuple(None if s == 1 else next(kept) for s in dst)


def analyze(body: Graph) -> dict:
    """The loop plan of a group body, or NotFusible. Plan keys: kind, domain, reduce_dims,
    maps (value name -> dim map of every node output)."""
    leaves = {v.name for v in body.inputs}
    reds = [n for n in body.nodes if op_kind(n.op) == OpKind.REDUCTION]
    try:
        specs = {id(n): reduction_spec(n) for n in reds}
    except NotLowerable as e:
        raise NotFusible(str(e)) from None
    if reds:
        shapes = {specs[id(n)][1].type.shape for n in reds}
        dims = {specs[id(n)][2] for n in reds}
        if len(shapes) != 1 or len(dims) != 1:
            raise NotFusible("reductions over different iteration spaces")
        domain, rdims = shapes.pop(), dims.pop()
        if not rdims and domain:
            raise NotFusible("empty reduction")
    else:
        outs = [v.type for v in body.output_values()]
        domain = max(outs, key=lambda t: t.numel).shape
        rdims = ()
    identity = tuple(i if s != 1 else None for i, s in enumerate(domain))
    maps: dict[str, DimMap] = {}

    def map_of(v: Value, out_map, out_shape):
        if v.name in leaves:
            return _right_align(v.type.shape, out_map, out_shape)
        return maps[v.name]

    for n in body.nodes:
        kind = op_kind(n.op)
        if kind == OpKind.REDUCTION:
            _, x, d, keep = specs[id(n)]
            if x.name not in leaves and tuple(maps[x.name]) != identity:
                raise NotFusible("reduction input does not walk the whole domain")
            maps[n.out.name] = tuple(None if i in d else identity[i] for i in range(len(domain))) if keep \
                else tuple(identity[i] for i in range(len(domain)) if i not in d)
        elif kind == OpKind.VIEW:
            src = n.args[0]
            if src.name in leaves:
                raise NotFusible("view of a group input stays outside the group")
            maps[n.out.name] = _view_map(n, maps[src.name], domain)
        elif kind == OpKind.POINTWISE:
            try:
                lower_pointwise(n)
            except NotLowerable as e:
                raise NotFusible(str(e)) from None
            oshape = n.out.type.shape
            cand: list = [None] * len(oshape)
            for a in n.inputs():
                if a.name in leaves:
                    continue
                am, off = maps[a.name], len(oshape) - a.type.rank
                for i, s in enumerate(a.type.shape):
                    if s != 1 and am[i] is not None:
                        j = off + i
                        if cand[j] is not None and cand[j] != am[i]:
                            raise NotFusible("operands walk different domain dims")
                        cand[j] = am[i]
            default = None
            for j, s in enumerate(oshape):
                if cand[j] is None and s != 1:
                    default = default or _default_map(oshape, domain)
                    cand[j] = default[j]
            maps[n.out.name] = tuple(cand)
        else:
            raise NotFusible(f"{n.op} is not fusible")
        for j, md in enumerate(maps[n.out.name]):
            if md is not None and domain[md] != n.out.type.shape[j]:
                raise NotFusible("dim size does not match the domain")
    R = set(rdims)
    for v in body.output_values():
        m = maps.get(v.name) if v.name not in leaves else None
        if m is None:
            raise NotFusible("group output is a group input")
        covered = {d for d in m if d is not None}
        need = {i for i, s in enumerate(domain) if s != 1}
        if covered != need and covered != need - R:
            raise NotFusible("output does not cover the iteration space")
    return {"kind": "reduction" if reds else "pointwise", "domain": list(domain),
            "reduce_dims": list(rdims), "maps": {k: list(v) for k, v in maps.items()}}

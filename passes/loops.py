"""Iteration-space analysis of a fusion group: the loop domain, the reduced dims, and for every
value in the group which domain dim each of its dims walks (its ``dim map``; None for a size-1,
broadcast dim). A group is legal exactly when this analysis succeeds; the result is recorded on
the fused node so code generators render it without deciding anything."""
from __future__ import annotations

from kiln.ir import Graph, Node, OpKind, Value, op_kind
from kiln.ir.scalar import NotLowerable, lower_pointwise, reduction_spec

DimMap = tuple     # per value dim: None (size 1), a domain dim, or a tuple of consecutive domain dims


class NotFusible(Exception):
    pass


class _Refine(Exception):
    """The domain must split dim ``dim`` into (outer, inner) for a value to map onto it."""
    def __init__(self, dim: int, inner: int):
        super().__init__(f"split domain dim {dim} at {inner}")
        self.dim, self.inner = dim, inner


def dims_of(md) -> tuple:
    """The domain dims a dim-map entry walks, outer to inner."""
    if md is None:
        return ()
    return tuple(md) if isinstance(md, (tuple, list)) else (md,)


def _entry(dims) -> object:
    dims = tuple(dims)
    return None if not dims else dims[0] if len(dims) == 1 else dims


def _size(md, domain) -> int:
    n = 1
    for d in dims_of(md):
        n *= domain[d]
    return n


def _product_map(shape, domain, notes: set) -> DimMap:
    """Right-aligned by running products: a value dim may walk several consecutive domain dims
    (a merged view of them); one that needs part of a domain dim asks for the domain to split.
    Adds "regrouped" to ``notes``: the plan then maps a value by regrouping its dims."""
    out, j = [], len(domain) - 1
    for s in reversed(shape):
        if s == 1:
            out.append(None)
            continue
        dims, p = [], 1
        while j >= 0 and p < s:
            if domain[j] != 1:
                if p * domain[j] > s and s % p == 0 and (domain[j] * p) % s == 0:
                    raise _Refine(j, s // p)
                dims.append(j)
                p *= domain[j]
            j -= 1
        if p != s:
            raise NotFusible(f"shape {shape} does not map onto domain {domain}")
        out.append(_entry(reversed(dims)))
    notes.add("regrouped")
    return tuple(reversed(out))


def _right_align(shape, dmap_out, out_shape) -> DimMap:
    """Dim map of an operand broadcast (numpy rules) against an output with map ``dmap_out``."""
    off = len(out_shape) - len(shape)
    return tuple(dmap_out[off + i] if shape[i] == out_shape[off + i] and shape[i] != 1 else None
                 for i in range(len(shape)))


def _default_map(shape, domain, notes: set) -> DimMap:
    """Right-aligned; extra leading dims are fine when they have size 1 (an unsqueeze). Failing
    that, by running products (a value that is a reshaped view of the domain)."""
    off = len(domain) - len(shape)
    out = []
    for i, s in enumerate(shape):
        if s == 1:
            out.append(None)
        elif off + i >= 0 and domain[off + i] == s:
            out.append(off + i)
        else:
            return _product_map(shape, domain, notes)
    return tuple(out)


# views whose elements are their source's in row-major order: a group folds them into indexing
RESHAPES = {"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.unsqueeze.default",
            "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default", "aten.alias.default",
            "aten.detach.default"}


def _view_map(node: Node, m: DimMap, domain, notes: set) -> DimMap:
    src, dst = node.args[0].type.shape, node.out.type.shape
    op = node.op
    if op == "aten.permute.default":
        return tuple(m[d % len(src)] for d in node.args[1])
    if op in ("aten.transpose.int", "aten.t.default"):
        a, b = (node.args[1] % len(src), node.args[2] % len(src)) if op == "aten.transpose.int" else (0, 1)
        out = list(m)
        if len(out) > 1:
            out[a], out[b] = m[b], m[a]
        return tuple(out)
    if op in ("aten.slice.Tensor", "aten.narrow.default") and tuple(src) == tuple(dst):
        return tuple(m)             # the whole dim: the same elements
    if op == "aten.expand.default":
        off = len(dst) - len(src)
        out = list(_default_map(dst, domain, notes))
        for i in range(len(src)):
            if src[i] != 1:
                out[off + i] = m[i]
        return tuple(out)
    if op not in RESHAPES:
        # a slice, select, diagonal, unfold or as_strided reads other elements than the ones its
        # position walks: folded as a reshape it read the wrong ones (softmax(x)[..., :1] * y)
        raise NotFusible(f"{op} is not a reshape")
    # unsqueeze / squeeze / view / reshape that only add or drop size-1 dims
    if [s for s in src if s != 1] == [s for s in dst if s != 1]:
        kept = iter([md for s, md in zip(src, m) if s != 1])
        return tuple(None if s == 1 else next(kept) for s in dst)
    # a reshape that merges or splits dims: regroup the domain dims the source walks, in order
    walked = [d for s, md in zip(src, m) if s != 1 for d in dims_of(md)]
    # in order: each dim after the last, past size-1 dims only (an unsqueezed output's)
    if [domain[d] for d in walked if domain[d] != 1] and \
            any(b <= a or any(domain[k] != 1 for k in range(a + 1, b)) for a, b in zip(walked, walked[1:])):
        raise NotFusible(f"{op} regroups dims the domain does not walk in order")
    out, i = [], 0
    for s in dst:
        if s == 1:
            out.append(None)
            continue
        dims, p = [], 1
        while p < s and i < len(walked):
            if p * domain[walked[i]] > s and s % p == 0 and (domain[walked[i]] * p) % s == 0:
                raise _Refine(walked[i], s // p)
            dims.append(walked[i])
            p *= domain[walked[i]]
            i += 1
        if p != s:
            raise NotFusible(f"{op} reshapes {src} -> {dst}")
        out.append(_entry(dims))
    return tuple(out)


def analyze(body: Graph) -> dict:
    """The loop plan of a group body, or NotFusible. Plan keys: kind, domain, reduce_dims,
    maps (value name -> dim map of every node output). A pointwise group whose values reshape
    one another (a view merging or splitting dims) gets the finest domain they all walk: the
    domain dims are split until every value maps onto consecutive runs of them.

    Maps run forward, from the group's inputs: an op that reads none of the group's values
    takes the default map of its shape. Where that fails (a product transposed, then broadcast
    into a cat: the rotary tables), the analysis runs again with the maps the group's consumers
    ask of such ops, walked back from its outputs (_hints)."""
    try:
        return _refining(body, hinted=False)
    except NotFusible:
        if any(op_kind(n.op) == OpKind.REDUCTION for n in body.nodes):
            raise           # a reduction fixes the domain and its maps: no hints to take
        return _refining(body, hinted=True)


def _refining(body: Graph, hinted: bool) -> dict:
    domain = None
    for _ in range(16):
        try:
            return _analyze(body, domain, hinted)
        except _Refine as r:
            if domain is None:
                domain = list(_domain(body)[0])
            d = list(domain)
            domain = d[:r.dim] + [d[r.dim] // r.inner, r.inner] + d[r.dim + 1:]
    raise NotFusible("the domain needs too many splits")


def _inverse_view(node: Node, m: DimMap, domain) -> DimMap | None:
    """The dim map a view's source needs for the view to have map ``m``, or None where the
    view does not say (a slice of part of a dim, a reshape that does not line up)."""
    src, dst = node.args[0].type.shape, node.out.type.shape
    op = node.op
    if op == "aten.permute.default":
        out = [None] * len(src)
        for i, d in enumerate(node.args[1]):
            out[d % len(src)] = m[i]
        return tuple(out)
    if op in ("aten.transpose.int", "aten.t.default") or \
            (op in ("aten.slice.Tensor", "aten.narrow.default") and tuple(src) == tuple(dst)):
        return _view_map(node, m, domain, set())        # its own inverse
    if op == "aten.expand.default":
        off = len(dst) - len(src)
        return tuple(None if s == 1 else m[off + i] for i, s in enumerate(src))
    if op not in RESHAPES:
        return None
    walked = [d for s, md in zip(dst, m) if s != 1 for d in dims_of(md)]
    if any(s != 1 and md is None for s, md in zip(dst, m)):
        return None
    out, i = [], 0
    for s in src:
        if s == 1:
            out.append(None)
            continue
        dims, p = [], 1
        while p < s and i < len(walked):
            dims.append(walked[i])
            p *= domain[walked[i]]
            i += 1
        if p != s:
            return None
        out.append(_entry(dims))
    return None if i != len(walked) else tuple(out)


def _domain(body: Graph) -> tuple[tuple, tuple]:
    reds = [n for n in body.nodes if op_kind(n.op) == OpKind.REDUCTION]
    if reds:
        _, x, d, _ = reduction_spec(reds[0])
        return x.type.shape, d
    outs = [v.type for v in body.output_values()]
    return max(outs, key=lambda t: t.numel).shape, ()


def _hints(body: Graph, domain, leaves: set) -> dict[str, DimMap]:
    """Per value, the dim map its consumers in the group read it with, walked back from the
    group's outputs (each on its default map) through pointwise ops and views."""
    hints: dict[str, DimMap] = {}
    for v in body.output_values():
        if v.name not in leaves:
            try:
                hints.setdefault(v.name, _default_map(v.type.shape, domain, set()))
            except (NotFusible, _Refine):
                pass
    for n in reversed(body.nodes):
        m = hints.get(n.out.name)
        if m is None:
            continue
        kind = op_kind(n.op)
        if kind == OpKind.POINTWISE:
            for a in n.inputs():
                if a.name not in leaves:
                    hints.setdefault(a.name, _right_align(a.type.shape, m, n.out.type.shape))
        elif kind == OpKind.VIEW and n.args[0].name not in leaves:
            inv = _inverse_view(n, m, domain)
            if inv is not None:
                hints.setdefault(n.args[0].name, inv)
    return hints


def _analyze(body: Graph, refined: list | None, hinted: bool = False) -> dict:
    notes = {"regrouped"} if refined is not None else set()
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
    if refined is not None:
        if reds:
            raise NotFusible("a reduction over a reshaped domain")
        domain = tuple(refined)
    identity = tuple(i if s != 1 else None for i, s in enumerate(domain))
    maps: dict[str, DimMap] = {}
    hints = _hints(body, domain, leaves) if hinted else {}

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
            maps[n.out.name] = _view_map(n, maps[src.name], domain, notes)
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
            hint = hints.get(n.out.name)
            for j, s in enumerate(oshape):
                if cand[j] is None and s != 1:
                    if hint is not None and hint[j] is not None and _size(hint[j], domain) == s:
                        cand[j] = hint[j]
                        continue
                    default = default or _default_map(oshape, domain, notes)
                    cand[j] = default[j]
            maps[n.out.name] = tuple(cand)
        else:
            raise NotFusible(f"{n.op} is not fusible")
        for j, md in enumerate(maps[n.out.name]):
            if md is not None and _size(md, domain) != n.out.type.shape[j]:
                raise NotFusible("dim size does not match the domain")
    R = set(rdims)
    for v in body.output_values():
        m = maps.get(v.name) if v.name not in leaves else None
        if m is None:
            raise NotFusible("group output is a group input")
        covered = {d for md in m for d in dims_of(md)}
        need = {i for i, s in enumerate(domain) if s != 1}
        if covered != need and covered != need - R:
            raise NotFusible("output does not cover the iteration space")
    maps_out = {k: list(v) for k, v in maps.items()}
    regrouped = "regrouped" in notes or any(isinstance(md, tuple) for m in maps.values() for md in m)
    return {"kind": "reduction" if reds else "pointwise", "domain": list(domain),
            "reduce_dims": list(rdims), "maps": maps_out, **({"regrouped": True} if regrouped else {})}

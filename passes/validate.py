"""An independent check of a memory plan against its graph. It recomputes liveness itself, from
op schemas (a return annotated as an alias, a mutating or unknown op, a view) rather than from
memory.py's analysis, and checks what the runtime relies on: two values whose bytes overlap are
never live at once (except a pointwise kernel, or an ATen op in its in-place form, writing over
an input at that input's last use), every value and view lies inside its buffer, offsets are
aligned, buffers fit the arena and the arena fits its capacity, and nothing in the arena reaches a
graph output."""
from __future__ import annotations

from kiln.ir import Graph, OpKind, op_kind, resolve
from .inplace import inner_names

ALIGN = 64


class PlanError(ValueError):
    """A memory plan that the runtime could not execute safely."""


def _may_alias(n) -> bool:
    if "callable" in n.attrs:
        return True
    if n.op.startswith("kiln."):
        return False
    if op_kind(n.op) == OpKind.VIEW:
        return True
    try:
        schema = resolve(n.op)._schema
    except KeyError:
        return True
    return schema.is_mutable or any(r.alias_info is not None for r in schema.returns)


def _in_place_ok(g: Graph, i: int, old: str, new: str, types) -> bool:
    """A fused kernel whose output ``new`` has the layout of its input ``old``, covers the whole
    loop domain, and whose body reads ``old`` only through pointwise ops of that same shape (a
    matmul's epilogue group too); or an ATen op with an in-place form (``index_put_``) whose
    first argument is ``old``."""
    n = g.nodes[i]
    if n.op.startswith("aten.") and n.op.count(".") == 2:     # run as its in-place form, which
        ns, name, overload = n.op.split(".")                    # must exist and write argument 0
        try:
            resolve(f"{ns}.{name}_.{overload}")
        except KeyError:
            return False
        a, b = types[old], types[new]
        return bool(n.args) and getattr(n.args[0], "name", None) == old and len(n.outputs) == 1 \
            and (a.shape, a.strides, a.dtype) == (b.shape, b.strides, b.dtype)
    if n.op == "kiln.matmul" and n.body is not None and old in {v.name for v in n.inputs()}:
        # a matmul's epilogue: the one body node reading ``old`` is a fused group that writes
        # ``new`` (each tile's epilogue loads its elements before it stores them), checked as above
        inner = {b.name for b, a in zip(n.body.inputs, n.args) if getattr(a, "name", None) == old}
        readers = [m for m in n.body.nodes if inner & {v.name for v in m.inputs()}]
        if len(readers) != 1 or readers[0].op != "kiln.fused" or new not in {v.name for v in readers[0].outputs}:
            return False
        return len(inner) == 1 and _fused_in_place(readers[0], next(iter(inner)), new, types[old], types[new])
    return n.op == "kiln.fused" and _fused_in_place(n, old, new, types[old], types[new])


def _fused_in_place(n, old: str, new: str, a, b) -> bool:
    plan = n.attrs.get("plan") or {}
    if plan.get("kind") not in ("pointwise", "reduction") or old not in {v.name for v in n.inputs()}:
        return False
    if (a.shape, a.strides, a.dtype) != (b.shape, b.strides, b.dtype):
        return False
    domain = 1
    for d in plan.get("domain", ()):
        domain *= d
    names = inner_names(n, old)
    return b.numel == domain and all(m.out.type.shape == a.shape and op_kind(m.op) == OpKind.POINTWISE
                                     for m in n.body.nodes if names & {v.name for v in m.inputs()})


def _check_overwrites(g: Graph, overwrites: dict[str, str], types, errs: list[str]) -> None:
    """An output written over input u at step i: no value that may share u's storage and existed
    before step i is read after it or returned, and the kernel is a legal in-place one."""
    origin: dict[str, set[str]] = {v.name: {v.name} for v in g.leaves()}
    born: dict[str, int] = {v.name: -1 for v in g.leaves()}
    reads: dict[str, int] = {}
    step: dict[str, int] = {}
    for i, n in enumerate(g.nodes):
        src = set().union(*(origin.get(x.name, set()) for x in n.inputs())) if n.inputs() else set()
        for x in n.inputs():
            reads[x.name] = i
        for v in n.outputs:
            born[v.name], step[v.name] = i, i
            if v.name in overwrites:
                origin[v.name] = set(origin.get(overwrites[v.name], ()))
            else:
                origin[v.name] = set(src) if _may_alias(n) else {v.name}
    outs = {v.name for v in g.output_values()}
    for v, u in overwrites.items():
        i = step.get(v)
        if i is None or u not in types or not _in_place_ok(g, i, u, v, types):
            errs.append(f"{v}: written over {u}, which is not a same-layout input of a pointwise-safe kernel")
            continue
        for x, o in origin.items():
            if x != v and born[x] <= i and o & origin[u] and (reads.get(x, -1) > i or x in outs):
                errs.append(f"{v} overwrites {u} at step {i}, but {x} (same storage) is read later")


def validate_plan(g: Graph, plan, capacity: int | None = None) -> list[str]:
    """Every problem found, one line each (empty: the plan is valid)."""
    errs: list[str] = []
    aliases = getattr(plan, "aliases", {}) or {}
    bufs = plan.buffers
    types = {v.name: v.type for v in g.leaves()}
    for n in g.nodes:
        for v in n.outputs:
            types[v.name] = v.type
    leaves = {v.name for v in g.leaves()}
    _check_overwrites(g, getattr(plan, "overwrites", {}) or {}, types, errs)
    for name in list(bufs) + list(aliases):
        if name in leaves:
            errs.append(f"{name} is a graph input or constant but has an arena buffer")
    for name, b in bufs.items():
        if b.offset < 0 or b.offset % ALIGN:
            errs.append(f"{name}: offset {b.offset} is not a non-negative multiple of {ALIGN}")
        if b.offset + b.nbytes > plan.arena_bytes:
            errs.append(f"{name}: bytes {b.offset}..{b.offset + b.nbytes} exceed the arena ({plan.arena_bytes})")
    if capacity is not None and plan.arena_bytes > capacity:
        errs.append(f"arena {plan.arena_bytes} B exceeds the capacity {capacity} B")

    # which stored values live in the arena, and which values may read each one's bytes
    home = {}                              # stored value -> buffer name
    storage: dict[str, set[str]] = {}      # any value -> stored values whose bytes it may read
    born: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, n in enumerate(g.nodes):
        for v in n.inputs():
            for s in storage.get(v.name, ()):
                last[s] = i
        for v in n.outputs:
            b = aliases.get(v.name, v.name)
            if b in bufs and (v.name in bufs or v.name in aliases):
                home[v.name], storage[v.name], born[v.name], last[v.name] = b, {v.name}, i, i
            elif _may_alias(n):
                storage[v.name] = set().union(*(storage.get(x.name, set()) for x in n.inputs()))
    for name in bufs:
        if name not in home and name not in leaves:
            errs.append(f"{name}: planned buffer written by no node of the graph")
    for v in g.output_values():
        for s in storage.get(v.name, ()):
            errs.append(f"graph output {v.name} reads arena bytes of {s} (they would be overwritten next call)")

    # sizes: each stored value and each single-storage view lies inside its buffer
    for name, t in types.items():
        st = storage.get(name, set())
        if t is None or len(st) != 1:
            continue
        s = next(iter(st))
        b = bufs[home[s]]
        if t.storage_bytes > b.nbytes:
            errs.append(f"{name}: spans {t.storage_bytes} B of storage but its buffer {b.name} has {b.nbytes} B")
    for s, bname in home.items():
        b = bufs[bname]
        if born[s] < b.start or last[s] > b.end:
            errs.append(f"{s}: live steps {born[s]}..{last[s]} but the plan says {b.start}..{b.end}")

    # no two stored values overlap in bytes while both are live
    segs = sorted((born[s], last[s], bufs[b].offset, bufs[b].offset + max(types[s].storage_bytes, 1), s)
                  for s, b in home.items())
    active: list[tuple] = []
    for seg in segs:
        t0, t1, lo, hi, s = seg
        active = [a for a in active if a[1] >= t0]
        for a0, a1, alo, ahi, other in active:
            if alo < hi and lo < ahi:
                if a1 == t0 and aliases.get(s) == home[other] and _in_place_ok(g, t0, other, s, types):
                    continue
                errs.append(f"{other} (steps {a0}..{a1}, bytes {alo}..{ahi}) and {s} (steps {t0}..{t1}, "
                            f"bytes {lo}..{hi}) overlap while both are live")
        active.append(seg)
    return errs


def check_plan(g: Graph, plan=None, capacity: int | None = None) -> None:
    """Raise PlanError listing the first problems of ``plan`` (default: the graph's own)."""
    plan = plan if plan is not None else g.meta.get("memory_plan")
    if plan is None:
        return
    errs = validate_plan(g, plan, capacity)
    if errs:
        more = f" (+{len(errs) - 5} more)" if len(errs) > 5 else ""
        raise PlanError("invalid memory plan: " + "; ".join(errs[:5]) + more)

"""Liveness and arena planning: buffers that are never live at the same time share arena bytes.

A buffer is the storage written by a generated kernel, or by an ATen op that has an ``out=``
overload (matmuls: the runtime passes the arena view as ``out``). Views and ops that may alias
their inputs extend the lifetime of the storage they read; storage that reaches a graph output
escapes and is never placed in the arena (the caller keeps it). A pointwise kernel may write its
output over an input whose last use it is (in-place reuse, recorded in ``MemoryPlan.aliases``).
Offsets come from greedy-by-size, or from the CP-SAT model in memory_ilp (never worse)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from kiln.ir import Graph, Node, OpKind, op_kind, resolve
from kiln.ir.ops import is_kernel_op

ALIGN = 64
# ATen ops whose outputs the runtime writes into the arena through their out= overload.
OUT_VARIANTS = {"aten.mm.default": "aten.mm.out", "aten.addmm.default": "aten.addmm.out",
                "aten.bmm.default": "aten.bmm.out", "aten.baddbmm.default": "aten.baddbmm.out"}


@dataclass
class Buffer:
    name: str
    nbytes: int
    start: int      # index of the producing step
    end: int        # index of the last step that reads the storage (or an alias of it)
    offset: int = -1


@dataclass
class MemoryPlan:
    buffers: dict[str, Buffer] = field(default_factory=dict)
    arena_bytes: int = 0
    peak_bytes: int = 0        # max bytes of planned buffers live at once (lower bound for the arena)
    aliases: dict[str, str] = field(default_factory=dict)   # in-place: value -> buffer whose bytes it reuses
    planner: str = "greedy"    # who chose the offsets: greedy | ilp
    status: str = ""           # ilp: optimal | improved | greedy (no better plan in the time limit)
    greedy_bytes: int = 0      # greedy-by-size's arena for the same buffers
    solve_s: float = 0.0

    def buffer_of(self, value: str) -> Buffer | None:
        """The buffer a value is written into: its own, or the one it reuses in place."""
        return self.buffers.get(self.aliases.get(value, value))

    def to_dict(self) -> dict:
        return {"arena_bytes": self.arena_bytes, "peak_bytes": self.peak_bytes,
                "buffers": {k: [b.offset, b.nbytes, b.start, b.end] for k, b in self.buffers.items()},
                "aliases": dict(self.aliases), "planner": self.planner, "status": self.status,
                "greedy_bytes": self.greedy_bytes, "solve_s": self.solve_s}

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryPlan":
        """Inverse of to_dict; raises TypeError/ValueError/AttributeError on malformed input."""
        bufs = {str(name): Buffer(str(name), int(nbytes), int(start), int(end), int(off))
                for name, (off, nbytes, start, end) in d.get("buffers", {}).items()}
        aliases = {str(k): str(v) for k, v in d.get("aliases", {}).items()}
        if any(v not in bufs for v in aliases.values()):
            raise ValueError("an in-place alias names a buffer the plan does not have")
        return cls(bufs, int(d.get("arena_bytes", 0)), int(d.get("peak_bytes", 0)), aliases,
                   str(d.get("planner", "greedy")), str(d.get("status", "")), int(d.get("greedy_bytes", 0)),
                   float(d.get("solve_s", 0.0)))


@functools.lru_cache(maxsize=None)
def out_variant(op: str) -> str | None:
    """The out= overload the runtime may call for ``op``, if it has one."""
    name = OUT_VARIANTS.get(op)
    if name is None:
        return None
    try:
        resolve(name)
    except KeyError:
        return None
    return name


@functools.lru_cache(maxsize=None)
def fresh_outputs(op: str) -> bool:
    """Ops whose outputs never alias their inputs: kiln kernels, and ATen ops whose schema marks
    no return as an alias (views, mutating and unknown ops may alias)."""
    if is_kernel_op(op) or op_kind(op) in (OpKind.POINTWISE, OpKind.REDUCTION, OpKind.MATMUL):
        return True
    if op_kind(op) == OpKind.VIEW:
        return False
    try:
        schema = resolve(op)._schema
    except KeyError:
        return False
    return not schema.is_mutable and all(r.alias_info is None for r in schema.returns)


def plannable(n: Node) -> bool:
    """Does this node write outputs the runtime can place in the arena?"""
    if is_kernel_op(n.op):
        return True
    return out_variant(n.op) is not None and len(n.outputs) == 1 and n.out.type is not None \
        and "callable" not in n.attrs


def storage_roots(g: Graph) -> dict[str, set[str]]:
    """value name -> names of planned buffers whose storage the value may alias."""
    roots: dict[str, set[str]] = {}
    for n in g.nodes:
        if plannable(n):
            for v in n.outputs:
                roots[v.name] = {v.name}
        elif not fresh_outputs(n.op) or "callable" in n.attrs:
            src = set().union(*(roots.get(v.name, set()) for v in n.inputs())) if n.inputs() else set()
            for v in n.outputs:
                roots[v.name] = set(src)
    return roots


def liveness(g: Graph) -> dict[str, Buffer]:
    roots = storage_roots(g)
    bufs: dict[str, Buffer] = {}
    for i, n in enumerate(g.nodes):
        if plannable(n):
            for v in n.outputs:
                if v.type is not None:
                    bufs[v.name] = Buffer(v.name, v.type.storage_bytes, i, i)
        for v in n.inputs():
            for r in roots.get(v.name, ()):
                if r in bufs:
                    bufs[r].end = max(bufs[r].end, i)
    escaping = set().union(*(roots.get(v.name, set()) for v in g.output_values())) if g.outputs else set()
    return {k: b for k, b in bufs.items() if k not in escaping and b.nbytes > 0}


def _full_strides(t, dmap, nd) -> tuple:
    st = [0] * nd
    for s, stride, d in zip(t.shape, t.strides, dmap):
        if d is not None and s != 1:
            st[d] = stride
    return tuple(st)


def elementwise_safe(n: Node, out, inp) -> bool:
    """Can output ``out`` of fused node ``n`` overwrite input ``inp``? Only for a pointwise
    kernel in which every load of ``inp`` reads exactly the element the store of ``out`` writes
    (same dtype, shape and strides; no broadcast or transposed read), so each element is read
    before it is overwritten and never read again."""
    plan = n.attrs.get("plan")
    if n.op != "kiln.fused" or not plan or plan.get("kind") != "pointwise" or n.body is None:
        return False
    a, b = inp.type, out.type
    if a is None or b is None or (a.shape, a.strides, a.dtype, a.offset) != (b.shape, b.strides, b.dtype, b.offset):
        return False
    maps, nd = plan["maps"], len(plan["domain"])
    want = _full_strides(b, maps[out.name], nd)
    reads = 0
    for m in n.body.nodes:
        for x in m.inputs():
            if x.name != inp.name:
                continue
            om, oshape = maps[m.out.name], m.out.type.shape
            off = len(oshape) - a.rank
            dmap = [om[off + i] if a.shape[i] == oshape[off + i] and a.shape[i] != 1 else None
                    for i in range(a.rank)]
            if op_kind(m.op) != OpKind.POINTWISE or _full_strides(a, dmap, nd) != want:
                return False
            reads += 1
    return reads > 0


def reuse_in_place(g: Graph, bufs: dict[str, Buffer]) -> dict[str, str]:
    """Merge each kernel output into the buffer of an input that dies at that kernel, where
    elementwise_safe allows. Returns value -> buffer it reuses; ``bufs`` is updated."""
    roots = storage_roots(g)
    aliases: dict[str, str] = {}
    home = lambda name: aliases.get(name, name)  # noqa: E731
    for i, n in enumerate(g.nodes):
        if n.op != "kiln.fused":
            continue
        taken: set[str] = set()
        ins = n.inputs()
        for v in n.outputs:
            if v.name not in bufs:
                continue
            for u in ins:
                r = home(u.name)
                if r in taken or r not in bufs or roots.get(u.name) != {u.name} or bufs[r].end != i \
                        or bufs[r].nbytes != bufs[v.name].nbytes:
                    continue
                if any(w is not u and r in {home(x) for x in roots.get(w.name, ())} for w in ins):
                    continue            # the kernel also reads this storage through another value
                if not elementwise_safe(n, v, u):
                    continue
                bufs[r].end = bufs.pop(v.name).end
                aliases[v.name] = r
                taken.add(r)
                break
    return aliases


def greedy_by_size(bufs: dict[str, Buffer]) -> int:
    """Place largest buffers first at the lowest offset that overlaps no live-overlapping buffer."""
    placed: list[Buffer] = []
    arena = 0
    for b in sorted(bufs.values(), key=lambda b: (-b.nbytes, b.start)):
        conflicts = sorted((p.offset, p.offset + p.nbytes) for p in placed
                           if not (p.end < b.start or b.end < p.start))
        off = 0
        for lo, hi in conflicts:
            if off + b.nbytes <= lo:
                break
            off = max(off, -(-hi // ALIGN) * ALIGN)
        b.offset = off
        placed.append(b)
        arena = max(arena, off + b.nbytes)
    return arena


def peak_live_bytes(bufs: dict[str, Buffer]) -> int:
    events: dict[int, int] = {}
    for b in bufs.values():
        events[b.start] = events.get(b.start, 0) + b.nbytes
        events[b.end + 1] = events.get(b.end + 1, 0) - b.nbytes
    peak = cur = 0
    for t in sorted(events):
        cur += events[t]
        peak = max(peak, cur)
    return peak


def plan_buffers(bufs: dict[str, Buffer], planner: str = "greedy", time_limit: float = 2.0) -> MemoryPlan:
    """Offsets for these buffers. ``planner``: "greedy" is greedy-by-size; "ilp" is the CP-SAT
    model warm-started from greedy (never larger); "rl" plans with greedy until the RL tier
    planner lands (it places tiers, not arena offsets)."""
    greedy = greedy_by_size(bufs)
    plan = MemoryPlan(bufs, greedy, peak_live_bytes(bufs), planner="greedy", greedy_bytes=greedy)
    if planner == "ilp" and bufs:
        from .memory_ilp import solve
        plan.arena_bytes, plan.status, plan.solve_s = solve(bufs, greedy, plan.peak_bytes, time_limit)
        plan.planner = "ilp"
    return plan


def plan_memory(g: Graph, options=None) -> Graph:
    bufs = liveness(g)
    target = options.resolved_target() if options is not None and hasattr(options, "resolved_target") else "cpu"
    # CUDA C kernels declare their pointers __restrict__, so they never run in place.
    aliases = reuse_in_place(g, bufs) if target != "cuda" else {}
    plan = plan_buffers(bufs, getattr(options, "planner", "greedy"), getattr(options, "ilp_time_limit", 2.0))
    plan.aliases = aliases
    g2 = g.copy()
    g2.meta["memory_plan"] = plan
    return g2

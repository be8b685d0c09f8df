"""Liveness and arena planning: buffers that are never live at the same time share arena bytes.

A buffer is the storage written by a generated kernel. Views and fallback ops that may alias
their inputs extend the lifetime of the storage they read; storage that reaches a graph output
escapes and is never placed in the arena (the caller keeps it)."""
from __future__ import annotations

from dataclasses import dataclass, field

from kiln.ir import Graph, OpKind, op_kind
from kiln.ir.ops import is_kernel_op

ALIGN = 64


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

    def to_dict(self) -> dict:
        return {"arena_bytes": self.arena_bytes, "peak_bytes": self.peak_bytes,
                "buffers": {k: [b.offset, b.nbytes, b.start, b.end] for k, b in self.buffers.items()}}


def _fresh(op: str) -> bool:
    """Ops whose outputs never alias their inputs."""
    return is_kernel_op(op) or op_kind(op) in (OpKind.POINTWISE, OpKind.REDUCTION, OpKind.MATMUL)


def storage_roots(g: Graph) -> dict[str, set[str]]:
    """value name -> names of planned buffers whose storage the value may alias."""
    roots: dict[str, set[str]] = {}
    for n in g.nodes:
        if is_kernel_op(n.op):
            for v in n.outputs:
                roots[v.name] = {v.name}
        elif not _fresh(n.op):
            src = set().union(*(roots.get(v.name, set()) for v in n.inputs())) if n.inputs() else set()
            for v in n.outputs:
                roots[v.name] = set(src)
    return roots


def liveness(g: Graph) -> dict[str, Buffer]:
    roots = storage_roots(g)
    bufs: dict[str, Buffer] = {}
    for i, n in enumerate(g.nodes):
        if is_kernel_op(n.op):
            for v in n.outputs:
                bufs[v.name] = Buffer(v.name, v.type.storage_bytes, i, i)
        for v in n.inputs():
            for r in roots.get(v.name, ()):
                bufs[r].end = max(bufs[r].end, i)
    escaping = set().union(*(roots.get(v.name, set()) for v in g.output_values())) if g.outputs else set()
    return {k: b for k, b in bufs.items() if k not in escaping and b.nbytes > 0}


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


def plan_memory(g: Graph, options=None) -> Graph:
    bufs = liveness(g)
    arena = greedy_by_size(bufs)
    g2 = g.copy()
    g2.meta["memory_plan"] = MemoryPlan(bufs, arena, peak_live_bytes(bufs))
    return g2

"""Liveness and arena planning: buffers that are never live at the same time share arena bytes.

A buffer is the storage written by a generated kernel, or by an ATen op that has an ``out=``
overload (matmuls: the runtime passes the arena view as ``out``). Views and ops that may alias
their inputs extend the lifetime of the storage they read; storage that reaches a graph output
escapes and is never placed in the arena (the caller keeps it). A kernel may write its output
over an input whose last use it is (inplace.py). Offsets come from greedy-by-size, or from the
CP-SAT model in memory_ilp (never worse).

The arena is held for the whole graph, so the device holds at worst the arena plus the peak of
everything else (ATen outputs, escaping values); PyTorch's caching allocator, freeing each
tensor at its last use, holds only the peak of all storage live at once. Where that is smaller
by a clear margin (DYNAMIC_MARGIN), the plan's mode is "dynamic": no arena, every output taken
from the allocator and freed at its last use (in-place reuse still applies). A training graph
without a memory budget takes dynamic mode whenever it is lower at all: a training step's peak is
what bounds its batch size, and an allocation per intermediate (~2 us of host time each) is small
against a step's kernels. (Under a budget the tier plan accounts for the arena: the margin stays.)"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

from kiln.ir import Graph, Node, OpKind, op_kind, resolve
from kiln.ir.ops import is_kernel_op

log = logging.getLogger("kiln.memory")

ALIGN = 64
DYNAMIC_MARGIN = (1 << 20, 0.05)    # dynamic mode must save >= 1 MiB and >= 5% of the arena plan's peak
# Devices whose allocator caches freed blocks, so dynamic mode costs no more than an arena. On the
# CPU a fresh large tensor is a new mmap whose pages fault on first touch (~10 ms per 32 MiB on a
# 2-core machine, more than the kernel that fills it): there the arena is kept.
DYNAMIC_DEVICES = ("cuda",)
ALLOC_GRAIN = 512       # the CUDA caching allocator rounds every block up to 512 bytes
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
    overwrites: dict[str, str] = field(default_factory=dict)  # in-place: value -> input it is written over
    mode: str = "arena"        # arena | dynamic (no arena: outputs from PyTorch's allocator)
    device_bytes: int = 0      # estimated peak device bytes of the graph's own storage in this mode

    def buffer_of(self, value: str) -> Buffer | None:
        """The buffer a value is written into: its own, or the one it reuses in place."""
        return self.buffers.get(self.aliases.get(value, value))

    def to_dict(self) -> dict:
        return {"arena_bytes": self.arena_bytes, "peak_bytes": self.peak_bytes,
                "buffers": {k: [b.offset, b.nbytes, b.start, b.end] for k, b in self.buffers.items()},
                "aliases": dict(self.aliases), "planner": self.planner, "status": self.status,
                "greedy_bytes": self.greedy_bytes, "solve_s": self.solve_s, "overwrites": dict(self.overwrites),
                "mode": self.mode, "device_bytes": self.device_bytes}

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryPlan":
        """Inverse of to_dict; raises TypeError/ValueError/AttributeError on malformed input."""
        bufs = {str(name): Buffer(str(name), int(nbytes), int(start), int(end), int(off))
                for name, (off, nbytes, start, end) in d.get("buffers", {}).items()}
        aliases = {str(k): str(v) for k, v in d.get("aliases", {}).items()}
        if any(v not in bufs for v in aliases.values()):
            raise ValueError("an in-place alias names a buffer the plan does not have")
        mode = str(d.get("mode", "arena"))
        if mode not in ("arena", "dynamic"):
            raise ValueError(f"unknown memory plan mode {mode!r}")
        return cls(bufs, int(d.get("arena_bytes", 0)), int(d.get("peak_bytes", 0)), aliases,
                   str(d.get("planner", "greedy")), str(d.get("status", "")), int(d.get("greedy_bytes", 0)),
                   float(d.get("solve_s", 0.0)), {str(k): str(v) for k, v in d.get("overwrites", {}).items()},
                   mode, int(d.get("device_bytes", 0)))


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


def freed_inputs(g: Graph) -> list[str]:
    """The inputs a graph frees at their last use: a backward's saved activations and tangents
    (AOTAutograd's boxed call hands the graph the only references to them), not the weights nor
    the forward's inputs (``primals_*``: the caller holds those). Other graphs free none."""
    if g.meta.get("graph_kind") != "backward":
        return []
    kept = set(g.meta.get("weight_inputs") or ())
    return [v.name for v in g.inputs if v.name not in kept and not v.name.startswith("primals_")]


def storage_lifetimes(g: Graph, overwrites: dict[str, str] | None = None, inputs=()
                      ) -> tuple[dict[str, set[str]], dict[str, int], dict[str, int]]:
    """(value -> the storages it may alias, storage -> step that makes it, storage -> last step
    that reads it through any alias; len(nodes) for one a graph output holds). A storage is
    named by the fresh output that makes it, or by one of ``inputs`` (made at step 0); an output
    in ``overwrites`` shares its input's storages."""
    overwrites = overwrites or {}
    roots: dict[str, set[str]] = {name: {name} for name in inputs}
    born: dict[str, int] = dict.fromkeys(inputs, 0)
    last: dict[str, int] = {}
    for i, n in enumerate(g.nodes):
        for v in n.inputs():
            for r in roots.get(v.name, ()):
                last[r] = i
        fresh = (fresh_outputs(n.op) and "callable" not in n.attrs) or plannable(n)
        src = set().union(*(roots.get(v.name, set()) for v in n.inputs())) if n.inputs() else set()
        for v in n.outputs:
            if v.name in overwrites:
                roots[v.name] = set(roots.get(overwrites[v.name], ()))
            elif fresh:
                roots[v.name], born[v.name] = {v.name}, i
            else:
                roots[v.name] = set(src)
    for v in g.output_values():
        for r in roots.get(v.name, ()):
            last[r] = len(g.nodes)
    return roots, born, last


def storage_peaks(g: Graph, arena: set[str], overwrites: dict[str, str], grain: int = 1,
                  inputs: list[str] = ()) -> tuple[int, int]:
    """(peak of storage outside ``arena``, peak of all storage) over the graph's steps, counting
    every output that does not alias an input; an in-place output shares its input's storage.
    ``grain``: the allocator's block granularity, each separate allocation rounds up to it.
    ``inputs``: graph inputs counted too, from the first step to their last use (freed_inputs)."""
    _, born, last = storage_lifetimes(g, overwrites, inputs)
    types = {v.name: v.type for v in g.inputs}
    types.update((v.name, v.type) for n in g.nodes for v in n.outputs)
    size = {r: -(-(types[r].storage_bytes if types.get(r) is not None else 0) // grain) * grain for r in born}
    end = len(g.nodes)
    delta = [[0, 0] for _ in range(end + 2)]
    for r, nb in size.items():
        k = int(r not in arena)
        delta[born[r]][k] += nb
        delta[last.get(r, born[r]) + 1][k] -= nb
    cur, other, total = [0, 0], 0, 0
    for d in delta:
        cur = [cur[0] + d[0], cur[1] + d[1]]
        other, total = max(other, cur[1]), max(total, cur[0] + cur[1])
    return other, total


def arena_plan(g: Graph, target: str = "cpu", planner: str = "greedy", time_limit: float = 2.0,
               grain: int = 1) -> tuple[MemoryPlan, int]:
    """The arena-mode plan of a scheduled graph, and the peak of all its storage live at once
    (what the dynamic mode would hold). ``grain``: the device allocator's block granularity, so
    that both sides count what the allocator would hand out (on a KB-sized graph the arena's
    64-byte packing against a 512-byte block per tensor decides the mode)."""
    from .inplace import reuse_in_place
    bufs = liveness(g)
    aliases, overwrites = reuse_in_place(g, bufs, storage_roots(g), target)
    plan = plan_buffers(bufs, planner, time_limit)
    plan.aliases, plan.overwrites = aliases, overwrites
    other, total = storage_peaks(g, set(bufs) | set(aliases), overwrites, grain)
    plan.device_bytes = -(-plan.arena_bytes // grain) * grain + other
    return plan, total


def plan_memory(g: Graph, options=None) -> Graph:
    target = options.resolved_target() if options is not None and hasattr(options, "resolved_target") else "cpu"
    # 0-d values do not count: a CPU scalar (a folded scalar_tensor's arithmetic) in a CUDA
    # graph is a number, not device storage, and kept its backward graphs off dynamic mode
    devices = {v.type.device.split(":")[0] for n in g.nodes for v in n.outputs if v.type is not None and v.type.rank}
    caching = bool(devices) and devices <= set(DYNAMIC_DEVICES)
    plan, total = arena_plan(g, target, getattr(options, "planner", "greedy"), getattr(options, "ilp_time_limit", 2.0),
                             ALLOC_GRAIN if caching else 1)
    training = g.meta.get("graph_kind") in ("forward", "backward") and getattr(options, "memory_budget", None) is None
    least, share = (1, 0.0) if training else DYNAMIC_MARGIN
    arena_bytes, dynamic_bytes, overwrites, freed = plan.device_bytes, total, plan.overwrites, []
    if caching:
        from .inplace import dynamic_overwrites
        # what the allocator would hold: in dynamic mode more outputs may be written over an
        # input that dies at their node (inplace.dynamic_overwrites), and a backward's saved
        # activations count from its start until their last use (the arena is taken while they
        # are all live)
        if getattr(options, "memory_budget", None) is None:
            overwrites = dynamic_overwrites(g, plan.overwrites, target)
        freed = freed_inputs(g)
        held = set(plan.buffers) | set(plan.aliases)
        other, _ = storage_peaks(g, held, plan.overwrites, ALLOC_GRAIN, freed)
        arena_bytes = -(-plan.arena_bytes // ALLOC_GRAIN) * ALLOC_GRAIN + other
        dynamic_bytes = storage_peaks(g, held, overwrites, ALLOC_GRAIN, freed)[1]
        total = storage_peaks(g, held, overwrites, ALLOC_GRAIN)[1]
    if caching and arena_bytes - dynamic_bytes >= max(least, share * arena_bytes):
        plan = MemoryPlan(overwrites=overwrites, planner=plan.planner, status=plan.status,
                          greedy_bytes=plan.greedy_bytes, solve_s=plan.solve_s, mode="dynamic", device_bytes=total)
    log.debug("memory plan of the %s graph: %s (arena mode %d B at peak, dynamic %d B%s; devices %s)",
              g.meta.get("graph_kind"), plan.mode, arena_bytes, dynamic_bytes,
              f", counting {len(freed)} inputs freed at their last use" if freed else "", sorted(devices))
    g2 = g.copy()
    g2.meta["memory_plan"] = plan
    return g2

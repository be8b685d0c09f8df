"""Tier mapping: which tier (device, host, disk) every weight lives in, and when it visits the device.

The planning problem is a timeline over the scheduled node list. Items are the weights (graph
constants, and graph inputs the capture marked as parameters) with the steps at which some
kernel reads them or a view of them (``segments``: the item must be on the device over each);
activations stay on the device and are fixed bytes per step (arena, fallback outputs, inputs).
A planner returns a TierPlan: each item's home tier and its device ``stays`` (issue the copy
before step ``load``, free after step ``evict``). Planners (greedy here, ILP in tiers_ilp, RL
registered later) share one interface, ``plan(problem, tiers, budget) -> TierPlan``, and the
simulator (simulate.py) that scores plans. Only active with memory_budget (or non-default tiers),
so the default pipeline pays nothing."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from kiln.ir import Graph, OpKind, op_kind, resolve
from kiln.ir.ops import is_kernel_op

# bytes/s between a tier and the device when a tier spec gives none (see kiln/options.py)
ALIGN = 256                          # device slots start at multiples of this (cache_schedule packs them)
FALLBACK_BANDWIDTH = {"cuda": {"device": 2.0e12, "host": 25e9, "disk": 2e9},
                      "cpu": {"device": 20e9, "host": 8e9, "disk": 1.5e9}}


class BudgetError(ValueError):
    """The device budget cannot hold what some step needs at once."""


@dataclass(frozen=True)
class Tier:
    name: str
    capacity: int | None = None      # bytes, None = unlimited
    bandwidth: float = 1e10          # bytes/s to/from the device tier


@dataclass
class Item:
    name: str
    nbytes: int
    segments: list                   # [(first, last)] steps over which it must be on the device
    kind: str = "weight"             # weight | activation (born on the device at its first segment)
    source: str = "constant"         # constant | input
    home: str = "host"
    dirty: bool = False              # written on the device: write back when evicted
    persistent_ok: bool = True       # unchanged between calls: may stay on the device for good
    must_persist: bool = False       # a view of it escapes the graph: keep it on the device for good

    @property
    def padded(self) -> int:
        """Device bytes its slot takes."""
        return -(-self.nbytes // ALIGN) * ALIGN


@dataclass
class Problem:
    n_steps: int
    items: list[Item]
    compute_s: list[float]           # estimated (or measured) seconds per step
    fixed_bytes: list[int]           # device bytes no planner moves, per step
    device: str = "cpu"              # cpu | cuda: how copies overlap (see simulate.py)
    static_pool: bool = True         # items share one pool: every step gets budget - max(fixed)
    step_names: list[str] = field(default_factory=list)
    activations: list = field(default_factory=list)   # (name, nbytes, first, last) device-resident
    fixed_parts: dict = field(default_factory=dict)    # arena / inputs / activations peak, for messages
    # outputs the device may hand to the host tier early (CPU): storage -> (nbytes, producer step,
    # last step that reads it in the graph, output names that are views of it); and those chosen
    spillable: dict = field(default_factory=dict)
    spills: list = field(default_factory=list)         # storages written to the host after their last read

    def spill(self, names) -> None:
        """Hand these outputs' storage to the host tier after its last read in the graph (they
        counted as device bytes to the end of the call): fixed bytes drop from that step on."""
        fixed = np.asarray(self.fixed_bytes, dtype=np.int64)
        for name in names:
            if name in self.spills or name not in self.spillable:
                continue
            nb, _, last, _ = self.spillable[name]
            fixed[last + 1:] -= nb
            self.spills.append(name)
        self.fixed_bytes = [int(x) for x in fixed]
        self.fixed_parts["peak_step"] = int(fixed.argmax()) if self.n_steps else 0

    def item_capacity(self, budget: int) -> np.ndarray:
        fixed = np.asarray(self.fixed_bytes or [0] * self.n_steps, dtype=np.int64)
        if self.static_pool:
            fixed = np.full(self.n_steps, int(fixed.max(initial=0)), dtype=np.int64)
        return np.int64(budget) - fixed

    def need(self) -> np.ndarray:
        """Item bytes each step needs on the device at once (on-demand loads, nothing kept)."""
        need = np.zeros(self.n_steps, dtype=np.int64)
        for it in self.items:
            if it.must_persist:
                need += it.padded
                continue
            for a, b in it.segments:
                need[a:b + 1] += it.padded
        return need

    def min_budget(self) -> int:
        fixed = np.asarray(self.fixed_bytes or [0], dtype=np.int64)
        need = self.need()
        if self.static_pool:
            return int(fixed.max(initial=0) + need.max(initial=0))
        return int((fixed + need).max(initial=0))


@dataclass
class Stay:
    item: str
    load: int        # the copy is issued before this step (-1: on the device before the call, for good)
    first: int       # first step that reads it during this stay
    evict: int       # last step of the stay; the memory is free after it


@dataclass
class TierPlan:
    homes: dict[str, str]
    stays: list[Stay]
    planner: str = "greedy"
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"planner": self.planner, "homes": dict(self.homes), "info": dict(self.info),
                "stays": [[s.item, s.load, s.first, s.evict] for s in self.stays]}


# ---- the problem from a graph -----------------------------------------------------------------
def _span_bytes(t) -> int:
    """Bytes of the storage range a (possibly strided) tensor type spans, from its first element."""
    if t is None or t.numel == 0:
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(t.shape, t.strides))) * t.itemsize


def _aliasing(op: str) -> bool:
    """May the op's outputs share storage with its inputs? (ATen's schema says; unknown ops may.)"""
    if is_kernel_op(op) or op_kind(op) in (OpKind.POINTWISE, OpKind.REDUCTION, OpKind.MATMUL):
        return False
    if op_kind(op) == OpKind.VIEW:
        return True
    try:
        return any(r.alias_info is not None for r in resolve(op)._schema.returns)
    except (KeyError, AttributeError):
        return True


def _merge(iv: list) -> list:
    out = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def build_problem(g: Graph, device: str = "cpu", compute_s=None) -> Problem:
    """Items, segments and fixed device bytes of a scheduled, memory-planned graph."""
    from .simulate import estimate_step_times
    n = len(g.nodes)
    weight_inputs = set(g.meta.get("weight_inputs", ())) | set(g.meta.get("host_inputs", ()))
    weights = {v.name: ("constant", v) for v in g.constant_values if _span_bytes(v.type) > 0}
    for v in g.inputs:
        if v.name in weight_inputs and _span_bytes(v.type) > 0 and not (device == "cuda" and v.type.device == "cuda"):
            weights[v.name] = ("input", v)       # a parameter the caller keeps off the device
    plan = g.meta.get("memory_plan")
    arena = set(plan.buffers) if plan is not None else set()
    roots: dict[str, set] = {v.name: {v.name} for v in g.leaves()}    # value -> storages it may alias
    chain: dict[str, str] = {w: w for w in weights}   # value -> the weight it is a pure view of
    define: dict[str, int] = {}
    uses: dict[str, list] = {}
    owned: dict[str, int] = {}               # storage owners outside the arena -> bytes
    for i, node in enumerate(g.nodes):
        ins = node.inputs()
        for v in ins:
            uses.setdefault(v.name, []).append(i)
        alias, view = _aliasing(node.op), op_kind(node.op) == OpKind.VIEW
        src = set().union(*(roots.get(v.name, set()) for v in ins)) if (alias and ins) else set()
        for v in node.outputs:
            define[v.name] = i
            roots[v.name] = set(src) if view else src | {v.name}
            if view and len(ins) == 1 and ins[0].name in chain:
                chain[v.name] = chain[ins[0].name]
            if not view and v.type is not None and v.name not in arena:
                owned[v.name] = v.type.storage_bytes
    escaping = {v.name for v in g.output_values()}
    # an escaping pure view of a weight is re-made from the weight's home after the call on the CPU
    # (runtime.tiers rebases it); anything else that escapes keeps its storage on the device
    rebased = {v for v in escaping if v in chain} if device == "cpu" else set()
    live: dict[str, list] = {}               # storage -> intervals over which something reads it
    inner: dict[str, int] = {}               # storage -> last step that writes or reads its data
    view_steps = {i for i, nd in enumerate(g.nodes) if not is_kernel_op(nd.op) and op_kind(nd.op) == OpKind.VIEW}
    for name, rs in roots.items():
        esc = name in escaping and name not in rebased
        if name in define:
            ivs = [(define[name], n - 1 if esc else max(uses.get(name, [define[name]])))]
            touch = [i for i in uses.get(name, []) if i not in view_steps]
            if define[name] not in view_steps:
                touch.append(define[name])
            for r in rs:
                inner[r] = max([inner.get(r, -1)] + touch)
        else:                                # a leaf: its own reads
            ivs = [(i, i) for i in uses.get(name, [])] + ([(0, n - 1)] if esc else [])
        for r in rs:
            live.setdefault(r, []).extend(ivs)
    esc_roots = set().union(*(roots[v] for v in escaping - rebased if v in roots)) if escaping else set()
    items = []
    for w, (src, v) in weights.items():
        segs = _merge(live.get(w, []))
        if not segs:
            continue
        escapes = w in esc_roots
        if escapes and (device == "cpu" or src == "input"):
            continue                         # used in place (the caller gets a view of its own tensor)
        items.append(Item(w, _span_bytes(v.type), segs, source=src, persistent_ok=(src == "constant"),
                          must_persist=escapes))
    # fixed device bytes: the arena, non-weight inputs and activations that own storage
    fixed = np.zeros(n, dtype=np.int64)
    arena_bytes = plan.arena_bytes if plan is not None else 0
    in_bytes = sum(v.type.storage_bytes for v in g.inputs if v.type is not None and v.name not in weights)
    fixed += arena_bytes + in_bytes
    acts = []
    for name, nb in owned.items():
        ivs = live.get(name, [])
        a, b = define[name], max((y for _, y in ivs), default=define[name])
        if nb:
            fixed[a:b + 1] += nb
            acts.append((name, nb, a, b))
    spillable = _spillable(owned, define, inner, roots, escaping - rebased, n, device)
    times = list(compute_s) if compute_s is not None else estimate_step_times(g, device)
    return Problem(n, items, times, [int(x) for x in fixed], device,
                   step_names=[nd.outputs[0].name if nd.outputs else nd.op for nd in g.nodes],
                   activations=acts, fixed_parts={"arena": arena_bytes, "inputs": in_bytes,
                                                  "peak_step": int(fixed.argmax()) if n else 0},
                   spillable=spillable)


def _spillable(owned: dict, define: dict, inner: dict, roots: dict, escaping: set, n: int, device: str) -> dict:
    """Storages made in the graph that reach its outputs (a training step's gradients, the
    activations a forward saves for the backward): on the CPU the runtime can copy such a storage
    to the host tier after the last step that touches its data and hand the caller the host copy
    (views made later are made of the copy), rather than hold it on the device to the end of the
    call. name -> (bytes, producer step, that last step, the values that view it alone); only
    storages whose every escaping view views it alone; not on CUDA, where autograd wants
    gradients on the parameter's device."""
    if device != "cpu":
        return {}
    esc_roots: set = set()
    bad = set()
    for v in escaping:
        rs = roots.get(v, set())
        (esc_roots if len(rs) == 1 else bad).update(rs)
    alias: dict[str, list] = {}
    for v, rs in roots.items():
        if len(rs) == 1 and next(iter(rs)) in esc_roots:
            alias.setdefault(next(iter(rs)), []).append(v)
    out = {}
    for r in esc_roots - bad:
        nb = owned.get(r, 0)
        last = inner.get(r, define.get(r, n - 1))
        if nb and r in define and last < n - 1:
            out[r] = (nb, define[r], last, sorted(alias.get(r, [r])))
    return out


def weight_views(g: Graph) -> list[str]:
    """Outputs of a (training forward) graph that are a weight input, or a chain of views of one
    (``g.meta['weight_inputs']``): the backward reads them as inputs, and they are the weights."""
    weights = set(g.meta.get("weight_inputs", ())) | {v.name for v in g.constant_values}
    chain = set(weights)
    for node in g.nodes:
        ins = node.inputs()
        if op_kind(node.op) == OpKind.VIEW and len(ins) == 1 and ins[0].name in chain:
            chain.update(v.name for v in node.outputs)
    return [v.name for v in g.output_values() if v.name in chain]


# ---- homes, validation ------------------------------------------------------------------------
def assign_homes(problem: Problem, tiers: dict) -> dict[str, str]:
    """Constants fill the host tier (most used first) and spill to disk; inputs stay where they are."""
    homes, used = {}, 0
    host = tiers.get("host")
    cap = math.inf if host is None or host.capacity is None else host.capacity
    order = sorted(problem.items, key=lambda it: (it.source != "input", -len(it.segments), it.segments[0][0]))
    for it in order:
        if it.source == "input" or (host is not None and used + it.nbytes <= cap):
            homes[it.name] = "host"
            used += it.nbytes
        elif "disk" in tiers:
            homes[it.name] = "disk"
        elif host is None:
            homes[it.name] = "device"
        else:
            need = sum(i.nbytes for i in problem.items if i.source == "constant")
            raise BudgetError(f"host tier capacity {fmt_bytes(cap)} cannot hold the weights ({fmt_bytes(need)}); "
                              f"add 'disk' to tiers or raise the host capacity to >= {need}")
    disk = tiers.get("disk")
    on_disk = sum(it.nbytes for it in problem.items if homes[it.name] == "disk")
    if disk is not None and disk.capacity is not None and on_disk > disk.capacity:
        raise BudgetError(f"disk tier capacity {fmt_bytes(disk.capacity)} cannot hold {fmt_bytes(on_disk)} of weights "
                          f"the host tier leaves over; raise the disk capacity to >= {on_disk} or the host's")
    return homes


def occupancy(problem: Problem, plan: TierPlan) -> np.ndarray:
    """Planned item bytes on the device per step."""
    size = {it.name: it.padded for it in problem.items}
    occ = np.zeros(problem.n_steps, dtype=np.int64)
    for s in plan.stays:
        occ[max(s.load, 0):s.evict + 1] += size[s.item]
    return occ


def validate_plan(problem: Problem, plan: TierPlan, budget: int, tiers: dict | None = None) -> list[str]:
    """Everything wrong with a plan (empty when valid): uncovered segments, overlapping stays,
    device capacity per step, home tier capacities."""
    errs = []
    by_item: dict[str, list] = {}
    for s in plan.stays:
        by_item.setdefault(s.item, []).append(s)
        if not (-1 <= s.load <= s.first <= s.evict < problem.n_steps):
            errs.append(f"{s.item}: stay out of order {s}")
    for it in problem.items:
        stays = sorted(by_item.get(it.name, []), key=lambda s: s.first)
        for a, b in zip(stays, stays[1:]):
            if b.load <= a.evict and b.load >= 0 or (b.load < 0):
                errs.append(f"{it.name}: stays overlap or a later one is persistent")
        for a, b in it.segments:
            if not any(max(s.load, 0) <= a and s.first <= a and s.evict >= b for s in stays):
                errs.append(f"{it.name}: not on the device over steps {a}..{b}")
        if it.must_persist and not (len(stays) == 1 and stays[0].load == -1):
            errs.append(f"{it.name}: a view of it escapes, it must stay on the device")
        if not it.persistent_ok and any(s.load < 0 for s in stays):
            errs.append(f"{it.name}: a graph input cannot stay on the device across calls")
        if it.name not in plan.homes:
            errs.append(f"{it.name}: no home tier")
    cap = problem.item_capacity(budget)
    over = np.nonzero(occupancy(problem, plan) > cap)[0]
    if len(over):
        errs.append(f"device tier over capacity at {len(over)} steps (first: step {over[0]})")
    if tiers:
        for t in ("host", "disk"):
            spec = tiers.get(t)
            used = sum(it.nbytes for it in problem.items if plan.homes.get(it.name) == t and it.source == "constant")
            if spec is not None and spec.capacity is not None and used > spec.capacity:
                errs.append(f"{t} tier holds {used} B > capacity {spec.capacity} B")
    return errs


def fmt_bytes(n: float) -> str:
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{int(n)} B"


def smallest_budget(problem: Problem) -> int:
    """The least device budget this runtime can run the graph in: everything on demand, packed."""
    from .cache_schedule import pack
    plan = on_demand(problem, {})
    return max(problem.min_budget(), max(problem.fixed_bytes, default=0) + pack(problem, plan)[1])


def budget_error(problem: Problem, budget: int, need: int | None = None, what: str = "memory_budget",
                 graph: str | None = None) -> BudgetError:
    need = smallest_budget(problem) if need is None else need
    fp = problem.fixed_parts
    which = f"this {graph} graph" if graph in ("forward", "backward") else "this graph"
    return BudgetError(
        f"{what} {fmt_bytes(budget)} ({budget} B) is too small for {which}: the smallest budget "
        f"that would work is {fmt_bytes(need)} ({need} B; activations, arena and inputs take "
        f"{fmt_bytes(max(problem.fixed_bytes, default=0))} at step {fp.get('peak_step', 0)}, the rest is "
        f"weights one step reads at once); use memory_budget >= {need}")


# ---- planners -----------------------------------------------------------------------------------
PLANNERS: dict[str, type] = {}


def register_planner(name: str):
    """Planners are classes with ``plan(problem, tiers, budget) -> TierPlan`` (tiers: name -> Tier)."""
    def deco(cls):
        PLANNERS[name] = cls
        return cls
    return deco


def get_planner(name: str):
    if name not in PLANNERS:
        import importlib
        try:       # the ILP and RL planners live in their own modules and register on import
            importlib.import_module(f"kiln.passes.tiers_{name}")
        except ImportError:
            pass
    cls = PLANNERS.get(name)
    if cls is None:
        import warnings
        warnings.warn(f"planner {name!r} is not available; using the greedy planner")
        cls = PLANNERS["greedy"]
    return cls()


def persistent_stays(problem: Problem, chosen) -> list[Stay]:
    return [Stay(it.name, -1, it.segments[0][0], problem.n_steps - 1) for it in problem.items if it.name in chosen]


@register_planner("greedy")
class GreedyPlanner:
    """Keep on the device for good what is used most per byte (and earliest), as much as leaves
    room to stream the rest; stream in order of use, each copy issued as early as capacity allows;
    keep an item across a short gap when it fits, evicting by furthest next use (Belady) when a
    later segment needs the room. Each split of persistent bytes is scored by the simulator."""
    levels = 8
    keep_gap = 64

    def plan(self, problem: Problem, tiers: dict, budget: int) -> TierPlan:
        from .simulate import simulate
        homes = assign_homes(problem, tiers)
        if problem.min_budget() > budget:
            raise budget_error(problem, budget)
        cap = problem.item_capacity(budget)
        need = problem.need()
        headroom = int((cap - need).min()) if problem.n_steps else 0
        forced = {it.name for it in problem.items if it.must_persist}
        eligible = sorted((it for it in problem.items if it.persistent_ok and not it.must_persist),
                          key=lambda it: (-len(it.segments) / it.nbytes, it.segments[0][0]))
        best, tried = None, set()
        for lv in range(self.levels + 1):
            target, chosen, extra = headroom * lv / self.levels, set(forced), np.zeros_like(need)
            for it in eligible:
                add = it.padded - _need_of(it, problem.n_steps)
                if (extra + add).max(initial=0) <= target:
                    chosen.add(it.name)
                    extra += add
            key = frozenset(chosen)
            if key in tried:
                continue
            tried.add(key)
            stays = persistent_stays(problem, chosen) + stream(problem, cap - persisted_bytes(problem, chosen),
                                                               [it for it in problem.items if it.name not in chosen],
                                                               self.keep_gap)
            plan = TierPlan(homes, stays, "greedy")
            t = simulate(problem, plan, tiers).time_s
            if best is None or t < best[0]:
                best = (t, plan)
        best[1].info["sim_s"] = best[0]
        return best[1]


def _need_of(it: Item, n: int) -> np.ndarray:
    v = np.zeros(n, dtype=np.int64)
    for a, b in it.segments:
        v[a:b + 1] = it.padded
    return v


def persisted_bytes(problem: Problem, chosen) -> int:
    return sum(it.padded for it in problem.items if it.name in chosen)


def stream(problem: Problem, cap: np.ndarray, items: list[Item], keep_gap: int = 64) -> list[Stay]:
    """Stays for items that visit the device: segments in order of use; a copy is issued as early
    as free capacity allows (never before an earlier-used copy: the copy stream is FIFO)."""
    n = problem.n_steps
    cap = np.asarray(cap, dtype=np.int64)
    occ = np.zeros(n, dtype=np.int64)
    segs = sorted(((a, b, k, it) for it in items for k, (a, b) in enumerate(it.segments)), key=lambda x: x[:3])
    open_: dict[str, Stay] = {}      # item -> its stay, kept across the gap to its next segment
    kept_to: dict[str, int] = {}     # item -> last step of the reserved gap
    last_issue, stays, last_evict = 0, [], {}
    padded = {it.name: it.padded for it in items}
    for a, b, k, it in segs:
        size = it.padded
        st = open_.pop(it.name, None)            # kept on the device since its previous segment
        kept_to.pop(it.name, None)
        while (occ[a:b + 1] + size > cap[a:b + 1]).any() and kept_to:
            victim = max(kept_to, key=lambda x: kept_to[x])              # furthest next use first
            vs = open_.pop(victim)
            occ[vs.evict + 1:kept_to.pop(victim) + 1] -= padded[victim]
        if (occ[a:b + 1] + size > cap[a:b + 1]).any():
            raise BudgetError(f"cannot fit {it.name} over steps {a}..{b} (capacity too small)")
        if st is not None:
            occ[a:b + 1] += size
            st.evict = b
        else:
            lo = max(last_issue, last_evict.get(it.name, -1) + 1)
            bad = np.nonzero(occ[lo:a] + size > cap[lo:a])[0]
            s = lo + (int(bad[-1]) + 1 if len(bad) else 0)
            st = Stay(it.name, s, a, b)
            occ[s:b + 1] += size
            stays.append(st)
            last_issue = s
        last_evict[it.name] = b
        if k + 1 < len(it.segments):
            nxt = it.segments[k + 1][0]
            if nxt - b - 1 <= keep_gap and (occ[b + 1:nxt] + size <= cap[b + 1:nxt]).all():
                occ[b + 1:nxt] += size
                open_[it.name], kept_to[it.name] = st, nxt - 1
    return stays


# ---- the pass -----------------------------------------------------------------------------------
def device_kind(options) -> str:
    import torch
    target = options.resolved_target() if hasattr(options, "resolved_target") else "cpu"
    return "cuda" if target in ("triton", "cuda") and torch.cuda.is_available() else "cpu"


def is_active(options) -> bool:
    if options is None:
        return False
    if getattr(options, "memory_budget", None) is not None:
        return True
    names = [getattr(t, "name", t) for t in getattr(options, "tiers", ())]
    return names != ["device", "host"] or any(getattr(t, "capacity", None) or getattr(t, "bandwidth", None)
                                              for t in getattr(options, "tiers", ()))


def resolve_tiers(options, device: str) -> dict[str, Tier]:
    specs = options.resolved_tiers(device) if hasattr(options, "resolved_tiers") else getattr(options, "tiers", ())
    out = {}
    for t in specs:
        name = getattr(t, "name", t)
        bw = getattr(t, "bandwidth", None) or FALLBACK_BANDWIDTH[device][name]
        out[name] = Tier(name, getattr(t, "capacity", None), float(bw))
    out.setdefault("device", Tier("device", None, FALLBACK_BANDWIDTH[device]["device"]))
    return out


def map_tiers(g: Graph, options=None) -> Graph:
    """Plan tiers for every weight (active only with a memory budget or explicit tiers)."""
    if not is_active(options) or not g.nodes:
        return g
    from .cache_schedule import pack
    device = device_kind(options)
    tiers = resolve_tiers(options, device)
    dev_cap = tiers["device"].capacity
    budget = min(x for x in (getattr(options, "memory_budget", None), dev_cap, 2**62) if x is not None)
    what = "memory_budget" if budget == getattr(options, "memory_budget", None) else "the device tier's capacity"
    problem = build_problem(g, device)
    if g.meta.get("spill_outputs") and step_bytes(problem) > budget:
        problem.spill(list(problem.spillable))  # a training forward: what it saves goes to the host
    choose_spills(problem, budget)
    if smallest_budget(problem) > budget:
        choose_spills(problem, 0)               # the least memory spilling can reach
        if smallest_budget(problem) > budget:
            raise budget_error(problem, budget, what=what, graph=g.meta.get("graph_kind"))
    planner = get_planner(getattr(options, "planner", "greedy"))
    if hasattr(planner, "time_limit") and getattr(options, "ilp_time_limit", None):
        planner.time_limit = options.ilp_time_limit
    fixed = max(problem.fixed_bytes, default=0)
    plan, target = None, budget
    for _ in range(3):          # the pool is packed with offsets: shrink the target if packing wastes room
        if target < problem.min_budget():
            break
        plan = planner.plan(problem, tiers, target)
        over = fixed + pack(problem, plan)[1] - budget
        if over <= 0:
            break
        target -= over
    if plan is None or fixed + pack(problem, plan)[1] > budget:
        homes = assign_homes(problem, tiers)
        plan = on_demand(problem, homes)            # the least memory any plan needs
        if fixed + pack(problem, plan)[1] > budget:
            raise budget_error(problem, budget, what=what, graph=g.meta.get("graph_kind"))
    g2 = g.copy()
    g2.meta["tier_problem"] = problem           # not serialised (no to_dict): the schedule carries what runs
    g2.meta["tier_plan"] = plan
    g2.meta["tier_tiers"] = tiers
    g2.meta["tier_budget"] = budget
    return g2


def step_bytes(problem: Problem) -> int:
    """A training forward's estimate of its whole step on the device at once: its own peak, all
    it saves for the backward, and its weights twice (the backward's gradients). A budget that
    holds this keeps the saved tensors on the device; a smaller one sends them to the host tier
    (the backward loads each when it reads it)."""
    return int(max(problem.fixed_bytes, default=0) + sum(v[0] for v in problem.spillable.values())
               + 2 * sum(it.padded for it in problem.items))


def choose_spills(problem: Problem, budget: int) -> list[str]:
    """Outputs to hand to the host tier early (Problem.spillable): while the device's fixed peak
    plus room for the weights one step reads and a prefetch of the next (twice the most any step
    reads) exceeds the budget, spill the largest output the peak step holds only because it
    escapes. ``budget=0`` spills all that lower the peak (the least memory). Nothing is chosen
    where the budget leaves room, so the problem is then unchanged."""
    if not problem.spillable or not problem.n_steps:
        return []
    want = 2 * int(problem.need().max(initial=0))
    while True:
        fixed = np.asarray(problem.fixed_bytes, dtype=np.int64)
        peak = int(fixed.max(initial=0))
        if peak + want <= budget:
            break
        at = int(fixed.argmax())
        cands = [(nb, name) for name, (nb, a, last, _) in problem.spillable.items()
                 if name not in problem.spills and a <= at and last < at]
        if not cands:
            break                      # nothing left that is live (and unread) at the peak step
        problem.spill([max(cands)[1]])  # the largest one the peak step holds for nothing
    return list(problem.spills)


def on_demand(problem: Problem, homes: dict) -> TierPlan:
    """The plan that loads every segment when it is needed and keeps nothing: the least memory."""
    stays = [Stay(it.name, a, a, b) for it in problem.items if not it.must_persist for a, b in it.segments]
    return TierPlan(homes, persistent_stays(problem, {it.name for it in problem.items if it.must_persist}) + stays,
                    "on_demand")

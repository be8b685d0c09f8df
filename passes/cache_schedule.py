"""Cache scheduling: a TierPlan becomes the steps the runtime executes.

Every device stay gets a slot (an offset in one device pool, packed like the arena so stays
that never overlap in time share bytes) and three steps: prefetch(item) before step ``load``
from its home tier, a wait before its first reader, and evict after step ``evict`` (write-back
first only for dirty items; weights are clean and never go back). A copy lands in memory an
earlier stay used, so it waits for the end of that stay's last step (``wait``): the exact event
the runtime's side stream waits on, and what the simulator scores the final schedule with.
``spills`` are outputs (a training step's gradients, saved activations) the runtime copies to the
host tier after their last read in the graph, which the caller then receives."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from kiln.ir import Graph
from .memory import Buffer, greedy_by_size


@dataclass
class Slot:
    item: str
    offset: int
    nbytes: int
    load: int          # -1: loaded once, stays for good
    first: int
    evict: int
    home: str
    wait: int = -1     # the step whose end frees this slot's memory (-1: free from the start)
    writeback: bool = False


@dataclass
class CacheSchedule:
    device: str
    budget: int
    pool_bytes: int
    slots: list[Slot]
    sources: dict                      # item -> constant | input
    fixed_bytes: list[int] = field(default_factory=list)
    compute_s: list[float] = field(default_factory=list)
    tiers: dict = field(default_factory=dict)      # name -> [capacity, bandwidth]
    planner: str = "greedy"
    sim: dict = field(default_factory=dict)        # simulated time_s, transfer_bytes ...
    n_steps: int = 0
    spills: list = field(default_factory=list)     # [storage, step, nbytes, [values viewing it]]: to the host after step

    def per_step(self):
        """(prefetch, ready, evict) slot indices per step."""
        n = self.n_steps
        pre, ready, ev = ([[] for _ in range(n)] for _ in range(3))
        for k, s in enumerate(self.slots):
            if s.load >= 0:
                pre[s.load].append(k)
                ready[s.first].append(k)
                ev[s.evict].append(k)
        for lst in pre:
            lst.sort(key=lambda k: self.slots[k].first)
        return pre, ready, ev

    def to_dict(self) -> dict:
        d = asdict(self)
        d["slots"] = [list(asdict(s).values()) for s in self.slots]
        return d

    @staticmethod
    def from_dict(d: dict) -> "CacheSchedule":
        d = dict(d)
        d["slots"] = [Slot(*s) for s in d["slots"]]
        return CacheSchedule(**d)

    def problem_and_plan(self):
        """A Problem/TierPlan pair that re-simulates this schedule (for explain and tests)."""
        from .tiers import Item, Problem, Stay, Tier, TierPlan
        items = {}
        for s in self.slots:
            it = items.setdefault(s.item, Item(s.item, s.nbytes, [], source=self.sources.get(s.item, "constant")))
            it.segments.append((s.first, s.evict))
        prob = Problem(self.n_steps, list(items.values()), list(self.compute_s), list(self.fixed_bytes), self.device,
                       spillable={r: (nb, step, step, list(outs)) for r, step, nb, outs in self.spills},
                       spills=[r for r, *_ in self.spills])
        plan = TierPlan({s.item: s.home for s in self.slots}, [Stay(s.item, s.load, s.first, s.evict) for s in self.slots],
                        self.planner)
        tiers = {k: Tier(k, v[0], v[1]) for k, v in self.tiers.items()}
        return prob, plan, tiers


def pack(problem, plan) -> tuple[list[int], int]:
    """Offsets of every stay in one device pool, and the pool's size."""
    size = {it.name: it.padded for it in problem.items}
    bufs = {str(k): Buffer(str(k), size[s.item], max(s.load, 0), s.evict)
            for k, s in enumerate(plan.stays)}
    for k, s in enumerate(plan.stays):
        if s.load < 0:
            bufs[str(k)].start, bufs[str(k)].end = 0, problem.n_steps - 1
    pool = greedy_by_size(bufs) if bufs else 0
    return [bufs[str(k)].offset for k in range(len(plan.stays))], pool


def waits_for(plan, offsets, sizes) -> dict[int, int]:
    """For each loaded stay, the last step of any earlier stay whose bytes it overwrites."""
    off = np.asarray(offsets, dtype=np.int64)
    nb = np.asarray(sizes, dtype=np.int64)
    ev = np.asarray([s.evict for s in plan.stays], dtype=np.int64)
    out = {}
    for k, s in enumerate(plan.stays):
        if s.load < 0:
            continue
        m = (off < off[k] + nb[k]) & (off[k] < off + nb) & (ev < s.load)
        out[k] = int(ev[m].max()) if m.any() else -1
    return out


def build_schedule(problem, plan, tiers, budget: int) -> CacheSchedule:
    from .simulate import simulate
    items = {it.name: it for it in problem.items}
    offsets, pool = pack(problem, plan)
    sizes = [items[s.item].nbytes for s in plan.stays]
    waits = waits_for(plan, offsets, sizes)
    written = set()
    slots = []
    for k, s in enumerate(plan.stays):
        it = items[s.item]
        wb = it.dirty and it.name not in written and s.evict < problem.n_steps - 1
        if wb:
            written.add(it.name)
        slots.append(Slot(s.item, offsets[k], it.nbytes, s.load, s.first, s.evict, plan.homes.get(s.item, "host"),
                          waits.get(k, -1), wb))
    res = simulate(problem, plan, tiers, waits=waits)
    sim = {"time_s": res.time_s, "compute_s": res.compute_s, "stall_s": res.stall_s,
           "transfer_bytes": res.transfer_bytes, "warmup_bytes": res.warmup_bytes,
           "peak": res.peak, "device_peak": int(max(problem.fixed_bytes, default=0) + pool)}
    return CacheSchedule(problem.device, int(budget), int(pool), slots,
                         {it.name: it.source for it in problem.items}, list(map(int, problem.fixed_bytes)),
                         [float(x) for x in problem.compute_s],
                         {k: [t.capacity, t.bandwidth] for k, t in tiers.items()}, plan.planner, sim, problem.n_steps,
                         [[r, problem.spillable[r][2], problem.spillable[r][0], list(problem.spillable[r][3])]
                          for r in problem.spills])


def schedule_cache(g: Graph, options=None) -> Graph:
    """Turn the tier plan (if map_tiers made one) into the runtime's prefetch/evict steps."""
    plan = g.meta.get("tier_plan")
    problem = g.meta.get("tier_problem")
    if plan is None or problem is None:
        return g
    g2 = g.copy()
    g2.meta["cache_schedule"] = build_schedule(problem, plan, g.meta["tier_tiers"], g.meta["tier_budget"])
    return g2

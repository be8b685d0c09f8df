"""The simulator every tier planner is scored by, its cost model, and the placement game.

Event-based, one forward sweep over the steps: a compute stream runs step t when step t-1 has
ended and every item t reads has arrived; copies run on FIFO channels at each tier's bandwidth
(CUDA: a copy stream, plus a disk-read thread feeding it; CPU: one background worker). A copy
issued before step s starts once the memory it lands in is free (the end of step ``wait``,
s-1 unless the packed schedule knows better) and, on the CPU, once the host reaches step s.
Dirty items are written back when evicted; spilled outputs (Problem.spills) are copied to the
host after the last step that touches them (on the CPU by the host thread, before the next
step). Returns the time per call, stalls, bytes moved and the occupancy of each tier; a plan
that overflows the device budget fails."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kiln.ir import Graph, OpKind, op_kind
from kiln.ir.ops import is_kernel_op
from .tiers import BudgetError, Problem, Stay, TierPlan, assign_homes, fmt_bytes, occupancy

# nominal peaks x achievable fraction; per-launch overhead. Measured step times override these.
_GPU_PEAKS = {  # name fragment: (bytes/s, low-precision FLOP/s, fp32 FLOP/s)
    "H200": (4.8e12, 989e12, 67e12), "H100": (3.35e12, 989e12, 67e12), "A100": (2.0e12, 312e12, 19.5e12),
    "L40": (0.86e12, 181e12, 90e12), "A10": (0.6e12, 125e12, 31e12)}
_GPU_DEFAULT = (1.0e12, 100e12, 20e12)
_CPU = (10e9, 50e9, 50e9)
EFFICIENCY = 0.7
OVERHEAD_S = {"cuda": 5e-6, "cpu": 1.5e-5}


class CapacityError(BudgetError):
    """A plan puts more on the device than the budget allows."""


def device_peaks(device: str) -> tuple[float, float, float]:
    if device != "cuda":
        return _CPU
    import torch
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in _GPU_PEAKS.items() if k in name), _GPU_DEFAULT)


def _flops(node) -> float:
    out = node.outputs[0].type if node.outputs and node.outputs[0].type is not None else None
    if out is None:
        return 0.0
    ins = [v.type for v in node.inputs() if v.type is not None]
    op = node.op
    if op in ("aten.mm.default", "aten.bmm.default", "aten.matmul.default") and ins:
        return 2.0 * out.numel * ins[0].shape[-1]
    if op in ("aten.addmm.default", "aten.baddbmm.default") and len(ins) > 1:
        return 2.0 * out.numel * ins[1].shape[-1]
    if op == "aten.linear.default" and ins:
        return 2.0 * out.numel * ins[0].shape[-1]
    if op == "aten.convolution.default" and len(ins) > 1:
        return 2.0 * out.numel * int(np.prod(ins[1].shape[1:]))
    if "scaled_dot_product" in op and len(ins) >= 3:
        q, k = ins[0], ins[1]
        return 4.0 * q.numel * k.shape[-2]
    return float(out.numel)


def estimate_step_times(g: Graph, device: str = "cpu") -> list[float]:
    """Roofline seconds per node: max(bytes / bandwidth, FLOPs / peak) + launch overhead."""
    bw, lowp, fp32 = device_peaks(device)
    times = []
    for node in g.nodes:
        if not is_kernel_op(node.op) and op_kind(node.op) == OpKind.VIEW:
            times.append(1e-6)
            continue
        nbytes = sum(v.type.nbytes for v in node.inputs() if v.type is not None)
        nbytes += sum(v.type.nbytes for v in node.outputs if v.type is not None)
        out = node.outputs[0].type if node.outputs else None
        peak = fp32 if out is None or out.itemsize >= 4 else lowp
        times.append(OVERHEAD_S[device] + max(nbytes / bw, _flops(node) / peak) / EFFICIENCY)
    return times


@dataclass
class SimResult:
    time_s: float
    compute_s: float
    stall_s: float
    transfer_bytes: int              # per call (loads + write-backs)
    warmup_bytes: int                # persistent items, loaded once
    writeback_bytes: int
    peak: dict                       # tier -> peak bytes
    device_bytes: np.ndarray         # fixed + planned items on the device, per step
    step_start: np.ndarray
    step_end: np.ndarray
    transfers: list = field(default_factory=list)   # {item, kind, tier, start, end, nbytes, issue}


def simulate(problem: Problem, plan: TierPlan, tiers: dict, budget: int | None = None,
             waits: dict | None = None) -> SimResult:
    """Score ``plan``. ``waits`` maps a stay index to the step whose end frees its memory."""
    n = problem.n_steps
    items = {it.name: it for it in problem.items}
    host_bw = tiers["host"].bandwidth if "host" in tiers else tiers["device"].bandwidth
    disk_bw = tiers["disk"].bandwidth if "disk" in tiers else host_bw
    occ = occupancy(problem, plan)
    if budget is not None:
        cap = problem.item_capacity(budget)
        over = np.nonzero(occ > cap)[0]
        if len(over):
            t = int(over[0])
            raise CapacityError(f"plan overflows the device budget {fmt_bytes(budget)} at step {t} "
                                f"({fmt_bytes(occ[t] + max(problem.fixed_bytes))} needed)")
    issued: dict[int, list] = {}
    arrive: dict[int, list] = {}
    wb_at: dict[int, list] = {}
    seen_dirty = set()
    for k, s in enumerate(plan.stays):
        it = items[s.item]
        if it.kind == "activation" and s.first == it.segments[0][0]:
            pass                                     # born on the device: its producer writes it there
        elif s.load >= 0:
            issued.setdefault(s.load, []).append(k)
            arrive.setdefault(s.first, []).append(k)
        if it.dirty and it.name not in seen_dirty and s.evict < n - 1:
            seen_dirty.add(it.name)
            wb_at.setdefault(s.evict + 1, []).append(k)
    spill_at: dict[int, list] = {}
    for name in getattr(problem, "spills", ()):
        spill_at.setdefault(problem.spillable[name][2], []).append(name)
    chan = {"copy": 0.0, "disk": 0.0}
    ready = {}
    start, end = np.zeros(n), np.zeros(n)
    transfers, moved, wb_bytes = [], 0, 0
    cuda = problem.device == "cuda"
    for t in range(n):
        prev = end[t - 1] if t else 0.0
        for k in wb_at.get(t, []):
            s = plan.stays[k]
            nb = items[s.item].nbytes
            c0 = max(chan["copy"], end[s.evict])
            chan["copy"] = c1 = c0 + nb / host_bw
            transfers.append({"item": s.item, "kind": "writeback", "tier": "host", "start": c0, "end": c1,
                              "nbytes": nb, "issue": t})
            wb_bytes += nb
        for k in sorted(issued.get(t, []), key=lambda k: plan.stays[k].first):
            s = plan.stays[k]
            nb, home = items[s.item].nbytes, plan.homes.get(s.item, "host")
            w = t - 1 if waits is None else waits.get(k, t - 1)
            t0 = end[w] if w >= 0 else 0.0
            if not cuda:
                t0 = max(t0, prev)                   # the host issues it when it reaches step t
            if cuda and home == "disk":
                d0 = max(chan["disk"], t0)
                chan["disk"] = t0 = d0 + nb / disk_bw
            c0 = max(chan["copy"], t0)
            chan["copy"] = c1 = c0 + nb / (disk_bw if (home == "disk" and not cuda) else host_bw)
            ready[k] = c1
            moved += nb
            transfers.append({"item": s.item, "kind": "load", "tier": home, "start": c0, "end": c1,
                              "nbytes": nb, "issue": t})
        st = max([prev] + [ready[k] for k in arrive.get(t, [])])
        start[t], end[t] = st, st + problem.compute_s[t]
        for name in spill_at.get(t, []):            # an output handed to the host after its last read:
            nb = problem.spillable[name][0]         # the host thread copies it before the next step
            c0 = end[t] if not cuda else max(chan["copy"], end[t])
            c1 = c0 + nb / host_bw
            if cuda:
                chan["copy"] = c1
            else:
                end[t] = c1
            transfers.append({"item": name, "kind": "writeback", "tier": "host", "start": c0, "end": c1,
                              "nbytes": nb, "issue": t})
            wb_bytes += nb
    fixed = np.asarray(problem.fixed_bytes or [0] * n, dtype=np.int64)
    dev = fixed + occ
    warm = sum(items[s.item].nbytes for s in plan.stays if s.load < 0)
    peak = {"device": int(dev.max(initial=0)),
            "host": sum(it.nbytes for it in problem.items if plan.homes.get(it.name, "host") == "host")
            + sum(problem.spillable[x][0] for x in getattr(problem, "spills", ())),
            "disk": sum(it.nbytes for it in problem.items if plan.homes.get(it.name) == "disk")}
    compute = float(np.sum(problem.compute_s))
    total = float(end[-1]) if n else 0.0
    return SimResult(total, compute, total - compute, moved + wb_bytes, warm, wb_bytes, peak, dev,
                     start, end, transfers)


# ---- the placement game (the RL planner's environment) ------------------------------------------
class PlanningEnv:
    """The placement game over a Problem, one decision per segment of a planned item, in order
    of use. Actions: ``KEEP`` (0: stay on the device since the item's previous segment),
    ``1 + j`` (load with lead LEADS[j] steps: 0 is on demand, more is a prefetch), ``PERSIST``
    (first segment only: keep it on the device for good). Eviction is implied: a stay ends with
    its segment unless the item's next decision keeps it. Reward: 0 until the end, then minus the
    simulated time; an action that does not fit ends the episode with ``-fail_penalty``.
    ``features()`` flattens the state for a policy network."""
    LEADS = (0, 1, 2, 4, 8, 16, 32, 64)
    WINDOW = 16

    def __init__(self, problem: Problem, tiers: dict, budget: int, fail_penalty: float | None = None):
        self.problem, self.tiers, self.budget = problem, tiers, budget
        self.cap = problem.item_capacity(budget)
        self.homes = assign_homes(problem, tiers)
        self.n_actions = len(self.LEADS) + 2
        self.PERSIST = self.n_actions - 1
        self.segs = sorted(((a, b, k, it) for it in problem.items if not it.must_persist
                            for k, (a, b) in enumerate(it.segments)), key=lambda x: (x[0], x[1], x[3].name))
        self.fail_penalty = fail_penalty if fail_penalty is not None else 10.0 * (sum(problem.compute_s) + 1.0)

    def reset(self) -> dict:
        self.pos = 0
        self.occ = np.zeros(self.problem.n_steps, dtype=np.int64)
        self.stays: list[Stay] = []
        self.open: dict[str, Stay] = {}
        self.persisted: set[str] = set()
        for it in self.problem.items:
            if it.must_persist:
                self._persist(it)
        self.done = False
        self._skip()
        return self.state()

    def _persist(self, it) -> None:
        self.stays.append(Stay(it.name, -1, it.segments[0][0], self.problem.n_steps - 1))
        self.occ += it.padded
        self.persisted.add(it.name)

    def _skip(self) -> None:
        while self.pos < len(self.segs) and self.segs[self.pos][3].name in self.persisted:
            self.pos += 1
        self.done = self.pos >= len(self.segs)

    def _range(self, action: int):
        """Steps [lo, hi] the action occupies, or None where the action is not allowed."""
        a, b, k, it = self.segs[self.pos]
        prev = self.open.get(it.name)
        if action == 0:
            return None if prev is None else (prev.evict + 1, b)
        if action == self.PERSIST:
            return (0, self.problem.n_steps - 1) if k == 0 and it.persistent_ok else None
        floor = prev.evict + 1 if prev is not None else 0
        return max(a - self.LEADS[action - 1], floor, 0), b

    def legal_actions(self) -> list[int]:
        if self.done:
            return []
        size = self.segs[self.pos][3].padded
        out = []
        for act in range(self.n_actions):
            r = self._range(act)
            if r is not None and (self.occ[r[0]:r[1] + 1] + size <= self.cap[r[0]:r[1] + 1]).all():
                out.append(act)
        return out

    def step(self, action: int):
        a, b, k, it = self.segs[self.pos]
        r = self._range(action)
        if r is None or (self.occ[r[0]:r[1] + 1] + it.padded > self.cap[r[0]:r[1] + 1]).any():
            self.done = True
            return self.state(), -self.fail_penalty, True, {"overflow": True}
        if action == self.PERSIST:
            self._persist(it)
        elif action == 0:
            st = self.open[it.name]
            st.evict = b
            self.occ[r[0]:r[1] + 1] += it.padded
        else:
            st = Stay(it.name, r[0], a, b)
            self.stays.append(st)
            self.open[it.name] = st
            self.occ[r[0]:r[1] + 1] += it.padded
        return self._advance()

    def _advance(self):
        """On to the next decision; after the last one, the whole plan's simulated time is the reward."""
        self.pos += 1
        self._skip()
        if not self.done:
            return self.state(), 0.0, False, {}
        plan = self.plan()
        res = simulate(self.problem, plan, self.tiers)
        return self.state(), -res.time_s, True, {"plan": plan, "time_s": res.time_s}

    def plan(self) -> TierPlan:
        return TierPlan(dict(self.homes), sorted(self.stays, key=lambda s: (s.first, s.item)), "rl")

    def state(self) -> dict:
        if self.done:
            return {"position": self.problem.n_steps, "done": True}
        a, b, k, it = self.segs[self.pos]
        w = self.WINDOW
        lo, hi = max(a - w, 0), min(a + w, self.problem.n_steps)
        free = np.zeros(2 * w)
        free[lo - (a - w):hi - (a - w)] = (self.cap[lo:hi] - self.occ[lo:hi]) / max(self.budget, 1)
        comp = np.zeros(w)
        seg = self.problem.compute_s[a:a + w]
        comp[:len(seg)] = seg
        nxt = [s[0] - a for s in it.segments[k + 1:k + 1 + 4]]
        return {"position": a, "segment": (a, b), "item": it.name, "nbytes": it.nbytes / max(self.budget, 1),
                "home": self.homes.get(it.name), "resident": it.name in self.open,
                "next_uses": nxt + [-1] * (4 - len(nxt)), "free_around": free, "compute_ahead": comp,
                "progress": self.pos / max(len(self.segs), 1), "legal": self.legal_actions(), "done": False}

    def features(self) -> np.ndarray:
        s = self.state()
        if s["done"]:
            return np.zeros(2 * self.WINDOW + self.WINDOW + 8)
        head = [s["nbytes"], float(s["resident"]), float(s["home"] == "disk"), s["progress"]]
        return np.concatenate([head, np.asarray(s["next_uses"], float) / self.problem.n_steps,
                               s["free_around"], np.asarray(s["compute_ahead"]) * 1e3])

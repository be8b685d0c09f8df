"""The ILP tier planner (OR-Tools CP-SAT), warm-started from greedy and never worse than it.

Each segment of a streamed item picks one option: keep (stay on the device since the item's
previous segment), or load with a lead of L steps (a prefetch issued L steps before the first
reader); each item that may stay for good has a persist flag. The options' occupancy must fit
the device capacity at every step. Time: E_t, the end of step t, satisfies
    E_t >= E_{t-1} + c_t                                  (the compute stream)
    E_a >= E_{s-1} + d * load(s -> a) + c_a               (a copy issued before s lands by a)
    E_a >= c_a + sum of d over loads used at or before a  (the copy stream is one FIFO)
and the objective is E_{n-1}. The simulator re-scores the solution; greedy's plan is kept when
it simulates faster (the model is a relaxation of the simulator).

``time_limit`` bounds the whole plan, model building included: the solver gets what is left of
it, and a model that is not built by then is not solved (status MODEL_TIMEOUT, greedy's plan)."""
from __future__ import annotations

import time

import numpy as np

from .tiers import GreedyPlanner, Stay, TierPlan, assign_homes, register_planner

LEADS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
TIME_UNIT = 1e-7        # seconds per integer time unit
BYTE_UNIT = 256         # = tiers.ALIGN: padded sizes are multiples of it, so capacities are exact


@register_planner("ilp")
class ILPPlanner:
    time_limit = 2.0

    def __init__(self, time_limit: float | None = None):
        if time_limit is not None:
            self.time_limit = time_limit

    def plan(self, problem, tiers, budget) -> TierPlan:
        from ortools.sat.python import cp_model

        from .simulate import simulate
        t0 = time.perf_counter()
        greedy = GreedyPlanner().plan(problem, tiers, budget)     # raises BudgetError when impossible
        homes = assign_homes(problem, tiers)
        n = problem.n_steps
        cap = (problem.item_capacity(budget) // BYTE_UNIT).astype(np.int64)
        host_bw = tiers["host"].bandwidth if "host" in tiers else tiers["device"].bandwidth
        disk_bw = tiers["disk"].bandwidth if "disk" in tiers else host_bw
        c = [max(1, int(round(x / TIME_UNIT))) for x in problem.compute_s]
        deadline = t0 + self.time_limit
        m = cp_model.CpModel()
        cover = [[] for _ in range(n)]            # (var, KiB) occupying each step
        persisted = []                            # (var, KiB): on the device at every step
        opts = {}                                 # (item, k) -> [(var, kind, s)]
        persist = {}
        g_stays = {}                              # item -> greedy's stays (hints, and options to offer)
        for st in greedy.stays:
            g_stays.setdefault(st.item, []).append(st)
        horizon = sum(c)
        for it in problem.items:
            if time.perf_counter() > deadline:
                return self._timeout(greedy, t0)
            size = -(-it.padded // BYTE_UNIT)
            d = it.nbytes / (disk_bw if homes.get(it.name) == "disk" else host_bw)
            if homes.get(it.name) == "disk" and problem.device == "cuda":
                d += it.nbytes / host_bw
            d = max(1, int(round(d / TIME_UNIT)))
            horizon += d * len(it.segments)
            if it.persistent_ok:
                y = persist[it.name] = m.NewBoolVar(f"p_{it.name}")
                persisted.append((y, size))
            if it.must_persist:
                m.Add(persist[it.name] == 1)
                continue
            prev_end = -1
            for k, (a, b) in enumerate(it.segments):
                lst = []
                if k > 0:
                    v = m.NewBoolVar(f"k_{it.name}_{k}")
                    lst.append((v, "keep", prev_end + 1, 0))
                starts = {max(a - L, prev_end + 1, 0) for L in LEADS}
                gs = next((s for s in g_stays.get(it.name, []) if s.first == a and s.load >= 0), None)
                if gs is not None and gs.load > prev_end:
                    starts.add(gs.load)
                for s in sorted(starts):
                    lst.append((m.NewBoolVar(f"l_{it.name}_{k}_{s}"), "load", s, d))
                m.AddExactlyOne([v for v, *_ in lst] + ([persist[it.name]] if it.name in persist else []))
                for v, kind, s, _ in lst:
                    for t in range(s, b + 1):
                        cover[t].append((v, size))
                opts[(it.name, k)] = (a, b, lst)
                prev_end = b
        ptotal = 0
        if persisted:                             # one sum for what stays for good, shared by every step
            ptotal = m.NewIntVar(0, sum(sz for _, sz in persisted), "persisted")
            m.Add(ptotal == sum(sz * y for y, sz in persisted))
        for t in range(n):
            if t % 64 == 0 and time.perf_counter() > deadline:
                return self._timeout(greedy, t0)
            if cover[t] or persisted:
                m.Add(sum(size * v for v, size in cover[t]) + ptotal <= int(cap[t]))
        E = [m.NewIntVar(0, horizon, f"E{t}") for t in range(n)]
        m.Add(E[0] >= c[0])
        for t in range(1, n):
            m.Add(E[t] >= E[t - 1] + c[t])
        at = [[] for _ in range(n)]
        for (name, k), (a, b, lst) in opts.items():
            for v, kind, s, d in lst:
                if kind == "load":
                    at[a].append((v, d))
                    m.Add(E[a] - (E[s - 1] if s > 0 else 0) - d * v >= c[a])
        cum = None
        for t in range(n):
            if at[t]:
                nxt = m.NewIntVar(0, horizon, f"C{t}")
                m.Add(nxt == (cum if cum is not None else 0) + sum(d * v for v, d in at[t]))
                m.Add(E[t] - nxt >= c[t])
                cum = nxt
        m.Minimize(E[n - 1])
        self._hint(m, greedy, opts, persist)
        solver = cp_model.CpSolver()
        left = deadline - time.perf_counter()
        if left <= 0:
            return self._timeout(greedy, t0)
        solver.parameters.max_time_in_seconds = left
        solver.parameters.num_workers = 2
        status = solver.Solve(m)
        info = {"status": solver.StatusName(status), "model_s": solver.ObjectiveValue() * TIME_UNIT
                if status in (cp_model.OPTIMAL, cp_model.FEASIBLE) else None,
                "bound_s": solver.BestObjectiveBound() * TIME_UNIT, "greedy_sim_s": greedy.info.get("sim_s")}
        best = greedy
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            plan = TierPlan(homes, self._decode(problem, solver, opts, persist), "ilp")
            sim = simulate(problem, plan, tiers).time_s
            info["ilp_sim_s"] = sim
            if sim <= greedy.info.get("sim_s", float("inf")):
                best = plan
                info["sim_s"] = sim
        if best is greedy:
            best = TierPlan(greedy.homes, greedy.stays, "ilp", dict(greedy.info))
            info["used"] = "greedy"
        else:
            info["used"] = "ilp"
        info["solve_s"] = time.perf_counter() - t0
        best.info.update(info)
        return best

    @staticmethod
    def _timeout(greedy, t0) -> TierPlan:
        """The time limit ran out while building the model: greedy's plan, said so."""
        best = TierPlan(greedy.homes, greedy.stays, "ilp", dict(greedy.info))
        best.info.update(status="MODEL_TIMEOUT", used="greedy", model_s=None, bound_s=None,
                         greedy_sim_s=greedy.info.get("sim_s"), solve_s=time.perf_counter() - t0)
        return best

    @staticmethod
    def _hint(m, greedy, opts, persist) -> None:
        persisted = {s.item for s in greedy.stays if s.load < 0}
        for name, y in persist.items():
            m.AddHint(y, name in persisted)
        by_item = {}
        for s in greedy.stays:
            by_item.setdefault(s.item, []).append(s)
        for (name, k), (a, b, lst) in opts.items():
            stay = next((s for s in by_item.get(name, []) if max(s.load, 0) <= a and s.evict >= b), None)
            for v, kind, s, _ in lst:
                if stay is None or stay.load < 0:
                    m.AddHint(v, False)
                elif stay.first < a:
                    m.AddHint(v, kind == "keep")
                else:
                    m.AddHint(v, kind == "load" and s == stay.load)

    @staticmethod
    def _decode(problem, solver, opts, persist) -> list[Stay]:
        stays, open_ = [], {}
        for name, y in persist.items():
            if solver.Value(y):
                it = next(i for i in problem.items if i.name == name)
                stays.append(Stay(name, -1, it.segments[0][0], problem.n_steps - 1))
        for (name, k), (a, b, lst) in sorted(opts.items(), key=lambda kv: kv[1][0]):
            if name in persist and solver.Value(persist[name]):
                continue
            for v, kind, s, _ in lst:
                if solver.Value(v):
                    if kind == "keep":
                        open_[name].evict = b
                    else:
                        open_[name] = Stay(name, s, a, b)
                        stays.append(open_[name])
        return stays


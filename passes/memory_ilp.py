"""Exact arena offsets with OR-Tools CP-SAT: each buffer is a box (bytes x steps); boxes must not
overlap; minimise the arena's end. Offsets are multiples of ALIGN, so a size rounded up to whole
ALIGN units overlaps exactly when the real bytes would, and the model works in those units.
The solver is warm-started from greedy-by-size, bounded above by greedy's arena and below by the
peak of live bytes (which proves greedy optimal for free when they meet), and time-limited: on a
timeout it keeps greedy's plan, so the result is never larger than greedy's."""
from __future__ import annotations

import os
import time

from .memory import ALIGN, Buffer


def solve(bufs: dict[str, Buffer], greedy_bytes: int, lower_bound: int,
          time_limit: float = 2.0) -> tuple[int, str, float]:
    """Improve the offsets in ``bufs`` (set by greedy) in place. Returns (arena bytes, status,
    seconds); status is "optimal" (proved), "improved" (better, not proved) or "greedy"."""
    t0 = time.perf_counter()
    if greedy_bytes <= lower_bound or len(bufs) < 2:
        return greedy_bytes, "optimal", time.perf_counter() - t0
    from ortools.sat.python import cp_model

    m = cp_model.CpModel()
    units = -(-greedy_bytes // ALIGN)
    items = list(bufs.values())
    arena = m.NewIntVar(lower_bound, greedy_bytes, "arena")
    xs, ys, sizes, ks = [], [], [], []
    for b in items:
        size = -(-b.nbytes // ALIGN)
        k = m.NewIntVar(0, max(0, (greedy_bytes - b.nbytes) // ALIGN), f"k_{len(ks)}")
        xs.append(m.NewIntervalVar(k, size, k + size, f"x_{len(ks)}"))
        ys.append(m.NewIntervalVar(b.start, b.end + 1 - b.start, b.end + 1, f"y_{len(ks)}"))
        m.Add(arena >= ALIGN * k + b.nbytes)
        m.AddHint(k, b.offset // ALIGN)
        sizes.append(size)
        ks.append(k)
    m.AddNoOverlap2D(xs, ys)
    # redundant: at every step the live buffers' units fit under the arena (a strong lower bound)
    cap = m.NewIntVar(0, units, "cap_units")
    m.Add(ALIGN * cap <= arena + ALIGN - 1)
    m.AddCumulative(ys, sizes, cap)
    m.Minimize(arena)

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit)
    solver.parameters.num_workers = max(1, min(8, os.cpu_count() or 1))
    status = solver.Solve(m)
    secs = time.perf_counter() - t0
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return greedy_bytes, "greedy", secs
    best = int(solver.ObjectiveValue())
    proved = status == cp_model.OPTIMAL
    if best >= greedy_bytes:
        return greedy_bytes, "optimal" if proved else "greedy", secs
    for b, k in zip(items, ks):
        b.offset = ALIGN * int(solver.Value(k))
    return best, "optimal" if proved else "improved", secs

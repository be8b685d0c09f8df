"""Where each statement of a loop kernel is emitted when the reduced dim is walked in loops:
x-space statements once per row as soon as their inputs exist, xr-space statements inside every
loop that needs them (recomputed from loads rather than kept in memory). Reductions that do not
depend on one another share one walk of the row (a corrected variance's sum(d) and sum(d*d)):
one loop instead of two when the row is looped, one cross-warp exchange when it fits."""
from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.scalar import Ref

from .lower import Access, LoopKernel, Reduce, Stmt, refs


@dataclass
class Stage:
    reduces: list[Stmt]           # independent reductions over one walk of the row; [] for the final store loop
    loop_loads: list[Access]      # xr loads inside the loop
    loop_stmts: list[Stmt]        # xr statements inside the loop
    after: list[Stmt]             # x statements computable once these reductions are done


def plan_stages(lk: LoopKernel) -> tuple[list[Stmt], list[Stage], Stage | None]:
    by_var = {s.var: s for s in lk.stmts}
    load_of = {a.var: a for a in lk.loads}

    def cone(roots: list[str]) -> set[str]:
        need: set[str] = set()
        stack = list(roots)
        while stack:
            v = stack.pop()
            if v in need:
                continue
            s = by_var.get(v)
            if s is not None and s.space == "xr" and not isinstance(s.expr, Reduce):
                need.add(v)
                stack.extend(refs(s.expr))
            elif v in load_of and load_of[v].space == "xr":
                need.add(v)
        return need

    def depends(v: str) -> set[str]:
        """Every statement ``v`` needs, through reductions and x statements too."""
        seen: set[str] = set()
        stack = [v]
        while stack:
            u = stack.pop()
            s = by_var.get(u)
            if u in seen or s is None:
                continue
            seen.add(u)
            stack.extend([s.expr.src] if isinstance(s.expr, Reduce) else refs(s.expr))
        return seen

    def stage(reduces: list[Stmt], roots: list[str], after: list[Stmt]) -> Stage:
        need = cone(roots)
        return Stage(reduces, [a for a in lk.loads if a.var in need], [s for s in lk.stmts if s.var in need], after)

    pre: list[Stmt] = []
    groups: list[tuple[list[Stmt], list[Stmt]]] = []       # (reductions, x statements after them)
    for s in lk.stmts:
        if isinstance(s.expr, Reduce):
            last = groups[-1] if groups else None
            if last is not None and not depends(s.expr.src) & {t.var for t in last[0] + last[1]}:
                last[0].append(s)
            else:
                groups.append(([s], []))
        elif s.space == "x":
            (groups[-1][1] if groups else pre).append(s)
    stages = [stage(reds, [r.expr.src for r in reds], after) for reds, after in groups]
    xr_stores = [a for a in lk.stores if a.space == "xr"]
    final = stage([], [a.var for a in xr_stores], []) if xr_stores else None
    return pre, stages, final


def online_softmax(lk: LoopKernel, stages: list[Stage]) -> dict[int, str]:
    """Stages ``i`` (a row max m) and ``i + 1`` (a row sum of exp(a - m)) that one walk of the row
    can compute together, keeping a running max and rescaling the running sum whenever it grows
    (Milakov and Gimelshein, "Online normalizer calculation for softmax", 2018): {i: the
    subtraction a - m}. Only where m enters the sum's walk through that subtraction alone and the
    walk reads nothing computed after the max. A looped softmax, log-softmax or cross-entropy then
    reads each row twice instead of three times."""
    by_var = {s.var: s for s in lk.stmts}
    found: dict[int, str] = {}
    for i in range(len(stages) - 1):
        a, b = stages[i], stages[i + 1]
        if i - 1 in found or len(a.reduces) != 1 or len(b.reduces) != 1:
            continue
        m, s = a.reduces[0], b.reduces[0]
        if m.expr.kind != "max" or s.expr.kind != "sum" or not m.expr.acc_dtype.is_floating_point \
                or not s.expr.acc_dtype.is_floating_point:
            continue
        e = by_var.get(s.expr.src)
        if e is None or getattr(e.expr, "op", None) != "exp" or not isinstance(e.expr.args[0], Ref):
            continue
        d = by_var.get(e.expr.args[0].name)
        if d is None or getattr(d.expr, "op", None) != "sub" or len(d.expr.args) != 2 \
                or not isinstance(d.expr.args[1], Ref) or d.expr.args[1].name != m.var:
            continue
        reads = [r for st in b.loop_stmts for r in refs(st.expr)]
        if reads.count(m.var) != 1 or {t.var for t in a.after} & set(reads):
            continue
        found[i] = d.var
    return found

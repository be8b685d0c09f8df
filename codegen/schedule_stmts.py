"""Where each statement of a loop kernel is emitted when the reduced dim is walked in loops:
x-space statements once per row as soon as their inputs exist, xr-space statements inside every
loop that needs them (recomputed from loads rather than kept in memory)."""
from __future__ import annotations

from dataclasses import dataclass

from .lower import Access, LoopKernel, Reduce, Stmt, refs


@dataclass
class Stage:
    reduce: Stmt | None           # None for the final store loop
    loop_loads: list[Access]      # xr loads inside the loop
    loop_stmts: list[Stmt]        # xr statements inside the loop
    after: list[Stmt]             # x statements computable once this reduction is done


def plan_stages(lk: LoopKernel) -> tuple[list[Stmt], list[Stage], Stage | None]:
    by_var = {s.var: s for s in lk.stmts}
    load_of = {a.var: a for a in lk.loads}

    def cone(roots: list[str]) -> tuple[list[Access], list[Stmt]]:
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
        loads = [a for a in lk.loads if a.var in need]
        stmts = [s for s in lk.stmts if s.var in need]
        return loads, stmts

    pre: list[Stmt] = []
    stages: list[Stage] = []
    for s in lk.stmts:
        if isinstance(s.expr, Reduce):
            loads, stmts = cone([s.expr.src])
            stages.append(Stage(s, loads, stmts, []))
        elif s.space == "x":
            (stages[-1].after if stages else pre).append(s)
    xr_stores = [a for a in lk.stores if a.space == "xr"]
    final = None
    if xr_stores:
        loads, stmts = cone([a.var for a in xr_stores])
        final = Stage(None, loads, stmts, [])
    return pre, stages, final

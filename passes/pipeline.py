"""The pass pipeline: one visible table of plain functions, run in order with timing."""
from __future__ import annotations

import time

from kiln.ir import Graph
from .addmm import recompose_addmm
from .attention import attention
from .cleanup import canonicalize_views, constant_fold, cse, dce, drop_copy_kernels, split_fills
from .fuse import fuse
from .gather import gather_rows
from .gather_sink import sink_gather
from .iota import mark_iota
from .one_hot import one_hot_scatter
from .matmul import matmul_fusion
from .cache_schedule import schedule_cache
from .memory import plan_memory
from .schedule import schedule
from .tiers import map_tiers
from .views import hoist_unsqueeze

PIPELINE = [
    ("dce", lambda g, o: dce(g)),
    ("cse", lambda g, o: cse(g)),
    ("constant_fold", lambda g, o: constant_fold(g)),
    ("canonicalize_views", lambda g, o: canonicalize_views(g)),
    ("dce_after_cleanup", lambda g, o: dce(g)),
    ("sink_gather", lambda g, o: dce(sink_gather(g))),     # cross-entropy: no full log-softmax written
    ("one_hot_scatter", lambda g, o: dce(one_hot_scatter(g))),  # ... nor its backward's scattered gradient
    ("attention", attention),            # before fuse/matmul: they would take its matmuls and softmax
    ("gather", gather_rows),             # embeddings as generated row-gather kernels
    ("addmm", recompose_addmm),          # cpu target: the bias back into ATen's addmm
    ("hoist_unsqueeze", lambda g, o: hoist_unsqueeze(g)),   # pointwise ops in their consumers' rank
    ("split_fills", lambda g, o: split_fills(g)),          # a zero fill made inside each kernel reading it
    ("fuse", fuse),
    ("drop_copy_kernels", lambda g, o: drop_copy_kernels(g)),
    ("matmul", matmul_fusion),
    ("iota", lambda g, o: mark_iota(g)),  # arange inputs computed from the index, not loaded
    ("schedule", schedule),
    ("plan_memory", plan_memory),
    ("map_tiers", map_tiers),            # both no-ops unless memory_budget (or tiers) is set
    ("schedule_cache", schedule_cache),
]


def run_pipeline(g: Graph, options, verify: bool = False) -> tuple[Graph, list[dict]]:
    """Run every pass; ``verify`` (on in tests) checks the graph after each one."""
    timings = []
    for name, fn in PIPELINE:
        if name == "fuse" and not getattr(options, "fusion", True):
            continue
        t0 = time.perf_counter()
        g = fn(g, options)
        timings.append({"name": name, "ms": (time.perf_counter() - t0) * 1e3})
        if verify:
            from kiln.ir.verify import verify as check
            check(g, where=f"after pass {name}")
            if name == "plan_memory":
                from .validate import check_plan
                check_plan(g)
    return g, timings

"""Arena planning figures for the model zoo and small transformers configs (GPT-2, Llama, BERT),
inference and training graphs (forward and backward of one step), target cpu (byte counts,
not times, so the CPU gives the same figures as a GPU would for the same graphs):

    PYTHONPATH=$PWD python bench/memory_planning.py [--time-limit 10] [--models mlp,gpt2] [--json out.json]

Per graph: planned buffers (after in-place merging), the lower bound (max bytes of planned
buffers live at once) without and with memory-aware scheduling, each planner's arena:
greedy-by-size, the CP-SAT arena with its status and solve time, and planner="rl" (which plans
arenas with greedy-by-size: the RL agent places tiers, not offsets), the scheduler's device cost (peak of planned
buffers + peak of other storage, see passes/schedule.py) before and after scheduling, and the
device bytes of the arena mode (arena + peak of other storage) against the dynamic mode (peak
of all storage), with the mode plan_memory picks. Every plan is checked by the validator.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "passes"))

import kiln  # noqa: E402
from kiln.passes.memory import arena_plan, plan_memory  # noqa: E402
from kiln.passes.pipeline import PIPELINE  # noqa: E402
from kiln.passes.validate import validate_plan  # noqa: E402
from memory_graphs import model_graphs, transformers_models, zoo  # noqa: E402


def passes(g, options, skip=()):
    for name, fn in PIPELINE:
        if name not in skip:
            g = fn(g, options)
    return g


def measure(g, time_limit: float) -> dict:
    """Arena-mode figures (whatever mode plan_memory picks for the graph, reported as ``mode``)."""
    opts = kiln.Options(target="cpu")
    unsched = passes(g, opts, skip=("schedule", "plan_memory", "map_tiers", "schedule_cache"))
    planned = passes(g, opts, skip=("plan_memory", "map_tiers", "schedule_cache"))
    mode = plan_memory(planned, opts).meta["memory_plan"]
    greedy, total = arena_plan(planned, "cpu", "greedy")
    t0 = time.perf_counter()
    ilp, _ = arena_plan(planned, "cpu", "ilp", time_limit)
    ilp_s = time.perf_counter() - t0
    rl, _ = arena_plan(planned, "cpu", "rl")
    for p in (greedy, ilp, rl):
        errs = validate_plan(planned, p)
        assert not errs, errs[:3]
    assert ilp.arena_bytes <= greedy.arena_bytes
    sched = planned.meta["schedule"]
    return {"nodes": len(planned.nodes), "buffers": len(greedy.buffers), "in_place": len(greedy.aliases),
            "lb_unscheduled": arena_plan(unsched)[0].peak_bytes, "lb": greedy.peak_bytes, "greedy": greedy.arena_bytes,
            "ilp": ilp.arena_bytes, "ilp_status": ilp.status, "rl": rl.arena_bytes, "ilp_s": round(ilp_s, 3),
            "cost_before": sched["cost_before"], "cost_after": sched["cost_after"],
            "storage_peak_before": sched["peak_before"], "storage_peak_after": sched["peak_after"],
            "mode": mode.mode, "device_arena_mode": greedy.device_bytes, "device_dynamic": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time-limit", type=float, default=10.0, help="CP-SAT seconds per graph")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--models", help="comma-separated subset of the zoo and transformers models (default: all)")
    args = ap.parse_args()
    rows = []
    names = list(zoo()[0]) + list(transformers_models())
    if args.models:
        unknown = sorted(set(args.models.split(",")) - set(names))
        if unknown:
            ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(names)}")
        names = [n for n in names if n in args.models.split(",")]
    print("| model | graph | nodes | buffers | in place | lower bound (unscheduled) | lower bound | greedy "
          "| greedy/LB | ILP | ILP/LB | ILP status, s | RL | schedule: device cost before -> after "
          "| device: arena mode / dynamic -> mode |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for train in (False, True):
            for kind, g in model_graphs(name, train):
                r = {"model": name, "graph": kind, **measure(g, args.time_limit)}
                rows.append(r)
                lb = max(r["lb"], 1)
                print(f"| {name} | {kind} | {r['nodes']} | {r['buffers']} | {r['in_place']} | {r['lb_unscheduled']:,} "
                      f"| {r['lb']:,} | {r['greedy']:,} | {r['greedy'] / lb:.3f} | {r['ilp']:,} | {r['ilp'] / lb:.3f} "
                      f"| {r['ilp_status']}, {r['ilp_s']} | {r['rl']:,} | {r['cost_before']:,} -> {r['cost_after']:,} "
                      f"| {r['device_arena_mode']:,} / {r['device_dynamic']:,} -> {r['mode']} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

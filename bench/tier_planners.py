"""Tier planners head to head: greedy, ILP (CP-SAT) and RL on generated problems (passes/tiers_gen.py,
30 to 2,000 steps) and on the tier problems of the model zoo and small transformers configs:

    PYTHONPATH=$PWD python bench/tier_planners.py [--ilp-time-limit 5] [--json out.json] [--quick]

Per problem and planner: simulated time per call (the shared simulator), planning time, failure
(an exception or a plan the validator rejects). For ILP: CP-SAT's status (OPTIMAL: optimal for
its model, which the simulator re-scores; FEASIBLE/UNKNOWN: stopped by the time limit, greedy's
plan or the best found is used). For RL: whether the agent's own plan was used or its safety net
(greedy's plan, when the agent's overflows or simulates slower), and the agent's raw time.
Budgets: between the smallest that works and everything on the device (tight ones most)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kiln.passes.tiers import get_planner, smallest_budget, validate_plan  # noqa: E402
from kiln.passes.tiers_gen import case  # noqa: E402
from kiln.passes.simulate import simulate  # noqa: E402

PLANNERS = ("greedy", "ilp", "rl")


def generated(quick: bool) -> list[tuple[str, object]]:
    out = []
    small = range(300_000, 300_020 if quick else 300_060)
    out += [("generated <= 200 steps", case(s, n=int(np.random.default_rng(s).integers(30, 200)))) for s in small]
    for n, count in ((500, 3 if quick else 6), (1000, 3 if quick else 9), (2000, 1 if quick else 3)):
        fams = ("stack", "chain", "branch")
        out += [(f"generated ~{n} steps", case(310_000 + n + i, family=fams[i % 3], n=n)) for i in range(count)]
    return out


def _budgets(problem, fracs=(0.0, 0.25, 0.5)) -> list[int]:
    lo = smallest_budget(problem)
    hi = max(problem.fixed_bytes, default=0) + sum(it.padded for it in problem.items)
    return sorted({int(lo + f * max(hi - lo, 0)) // 256 * 256 + 256 for f in fracs})


def model_problems(quick: bool) -> list[tuple[str, object]]:
    """(group, Case) from the zoo and transformers graphs, at three budgets each."""
    import torch

    from kiln.passes.tiers_gen import Case
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from models.zoo import ZOO, build       # the one name the zoo may load under (see its custom op)
    from tests.tiers.common import planned_graph
    out = []
    graphs = []
    for name in sorted(ZOO):
        model, inputs = build(name)
        graphs.append((f"zoo {name}", planned_graph(model, inputs, target="cpu", memory_budget=1 << 50)))
    try:
        graphs += _transformer_graphs(quick)
    except ImportError:
        print("transformers not installed: skipping its models", file=sys.stderr)
    torch._dynamo.reset()
    for name, g in graphs:
        p, tiers = g.meta["tier_problem"], g.meta["tier_tiers"]
        if not [it for it in p.items if not it.must_persist]:
            continue
        group = "zoo" if name.startswith("zoo") else "transformers"
        for b in _budgets(p):
            out.append((group, Case(f"{name} n{p.n_steps} budget {b}", p, tiers, b)))
    return out


def _transformer_graphs(quick: bool):
    import torch
    import transformers

    import kiln
    from kiln.api import captured_graphs
    from kiln.passes import run_pipeline
    transformers.logging.set_verbosity_error()
    cfgs = {"gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
                n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0)),
            "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
                hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=256, max_position_embeddings=64))}
    out = []
    for name, make in cfgs.items():
        torch.manual_seed(0)
        model = make().eval()
        ids = torch.randint(0, 256, (2, 16))

        def steps(backend):
            torch._dynamo.reset()
            with torch.no_grad():
                torch.compile(model, backend=backend, dynamic=False)(input_ids=ids)
            if not quick:                               # a training step: forward and backward graphs
                torch._dynamo.reset()
                model.train()
                torch.compile(model, backend=backend, dynamic=False)(input_ids=ids, labels=ids).loss.backward()
        graphs = captured_graphs(steps)
        for kind, g0 in graphs:
            g = run_pipeline(g0, kiln.Options.make(target="cpu", memory_budget=1 << 50))[0]
            out.append((f"{name} {kind}", g))
    return out


def run_one(c, ilp_time_limit: float) -> dict:
    row = {"case": c.name, "steps": c.problem.n_steps, "items": len(c.problem.items)}
    for name in PLANNERS:
        planner = get_planner(name)
        if name == "ilp":
            planner.time_limit = ilp_time_limit
        t0 = time.perf_counter()
        try:
            plan = planner.plan(c.problem, c.tiers, c.budget)
            dt = time.perf_counter() - t0
            errs = validate_plan(c.problem, plan, c.budget, c.tiers)
            r = {"time_s": simulate(c.problem, plan, c.tiers, budget=c.budget).time_s, "plan_s": dt,
                 "failed": bool(errs), "error": errs[0] if errs else None}
            if name == "ilp":
                r["status"] = plan.info.get("status")
                r["used"] = plan.info.get("used")
            if name == "rl":
                r["used"] = plan.info.get("used")
                r["agent_time_s"] = plan.info.get("agent_sim_s")
                r["argmax_time_s"] = plan.info.get("argmax_sim_s")
                r["games"] = plan.info.get("games")
                r["search_cut"] = plan.info.get("search_cut")
                r["reason"] = plan.info.get("reason")
        except Exception as e:                        # noqa: BLE001  a failure is a result here
            r = {"time_s": None, "plan_s": time.perf_counter() - t0, "failed": True, "error": f"{type(e).__name__}: {e}"}
        row[name] = r
    return row


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    groups = [(g, [r for r in rows if r["group"] == g]) for g in dict.fromkeys(r["group"] for r in rows)]
    gen = [r for r in rows if r["group"].startswith("generated")]
    models = [r for r in rows if not r["group"].startswith("generated")]
    groups += [(name, rs) for name, rs in (("all generated", gen), ("all zoo + transformers", models),
                                           ("all", rows)) if rs]
    for group, rs in groups:
        ok = [r for r in rs if not r["greedy"]["failed"]]
        s = {"group": group, "problems": len(rs), "max_steps": max(r["steps"] for r in rs)}
        for name in PLANNERS:
            good = [r for r in ok if not r[name]["failed"]]
            ratios = [r[name]["time_s"] / r["greedy"]["time_s"] for r in good]
            s[name] = {"ratio_mean": float(np.mean(ratios)) if ratios else None,
                       "ratio_min": float(np.min(ratios)) if ratios else None,
                       "better": sum(x < 1 - 1e-9 for x in ratios),
                       "plan_s_mean": float(np.mean([r[name]["plan_s"] for r in rs])),
                       "plan_s_max": float(np.max([r[name]["plan_s"] for r in rs])),
                       "failures": sum(r[name]["failed"] for r in rs)}
        s["ilp"]["optimal"] = sum(r["ilp"].get("status") == "OPTIMAL" for r in rs)
        s["ilp"]["timeouts"] = sum(r["ilp"].get("status") in ("FEASIBLE", "UNKNOWN", "MODEL_TIMEOUT") for r in rs)
        s["rl"]["fallbacks"] = sum(r["rl"].get("used") == "greedy" for r in rs)
        for key, col in (("agent_time_s", "agent"), ("argmax_time_s", "argmax")):
            # the agent's own plan (search: best of its games; argmax: its first game alone),
            # before the safety net; an overflowing game counts as a failure, not in the mean
            vals = [r["rl"].get(key) for r in ok]
            ratios = [v / r["greedy"]["time_s"] for v, r in zip(vals, ok) if v not in (None, float("inf"))]
            s["rl"][f"{col}_ratio_mean"] = float(np.mean(ratios)) if ratios else None
            s["rl"][f"{col}_better"] = sum(x < 1 - 1e-9 for x in ratios)
            s["rl"][f"{col}_worse"] = sum(x > 1 + 1e-9 for x in ratios)
            s["rl"][f"{col}_failed"] = sum(v == float("inf") for v in vals)
        s["rl"]["used_agent"] = sum(r["rl"].get("used") == "rl" for r in rs)
        s["rl"]["search_cut"] = sum(bool(r["rl"].get("search_cut")) for r in rs)
        out.append(s)
    return out


def table(summary: list[dict]) -> str:
    lines = ["| problems | n | max steps | ILP / greedy (mean, best) | RL / greedy, safety-netted (mean, best) "
             "| RL agent alone / greedy: search (better/worse) | agent argmax game / greedy (better/worse) "
             "| agent's plan used / greedy's (net) | plan s greedy / ILP / RL (mean; max) | ILP optimal / time-outs "
             "| failures g / ILP / RL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        g, i, r = s["greedy"], s["ilp"], s["rl"]
        f = (lambda x: "-" if x is None else f"{x:.3f}")
        lines.append(
            f"| {s['group']} | {s['problems']} | {s['max_steps']} | {f(i['ratio_mean'])}, {f(i['ratio_min'])} | "
            f"{f(r['ratio_mean'])}, {f(r['ratio_min'])} | {f(r['agent_ratio_mean'])} ({r['agent_better']}/{r['agent_worse']}) | "
            f"{f(r['argmax_ratio_mean'])} ({r['argmax_better']}/{r['argmax_worse']}) | {r['used_agent']} / {r['fallbacks']} | "
            f"{g['plan_s_mean']:.3f} / {i['plan_s_mean']:.2f} / {r['plan_s_mean']:.3f}; "
            f"{g['plan_s_max']:.3f} / {i['plan_s_max']:.2f} / {r['plan_s_max']:.3f} | "
            f"{i['optimal']} / {i['timeouts']} | {g['failures']} / {i['failures']} / {r['failures']} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ilp-time-limit", type=float, default=5.0)
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="fewer problems, no training graphs")
    ap.add_argument("--no-models", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    problems = generated(args.quick) + ([] if args.no_models else model_problems(args.quick))
    rows = []
    for group, c in problems:
        row = run_one(c, args.ilp_time_limit)
        row["group"] = group
        rows.append(row)
        print(f"{c.name:44s} " + "  ".join(
            f"{n} {row[n]['time_s']:.3e}s ({row[n]['plan_s']:.2f}s)" if row[n]["time_s"] else f"{n} FAILED"
            for n in PLANNERS) + f"  ilp {row['ilp'].get('status')}  rl {row['rl'].get('used')}", flush=True)
    summary = summarise(rows)
    print(table(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": summary}, f, indent=1, default=float)


if __name__ == "__main__":
    main()

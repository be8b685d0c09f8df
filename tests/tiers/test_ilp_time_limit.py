"""The ILP tier planner is optimal or times out cleanly: its time limit bounds the whole plan
(model building included), and a time-out returns a valid plan that is never slower than greedy's."""
from __future__ import annotations

import time

from kiln.passes.tiers import validate_plan
from kiln.passes.tiers_gen import case
from kiln.passes.tiers_ilp import ILPPlanner


def test_ilp_time_limit_bounds_planning_on_a_large_problem():
    c = case(311_000 + 1, family="chain", n=1000)
    for limit in (0.05, 1.0):                        # the model is not even built / the solver runs out
        t0 = time.perf_counter()
        plan = ILPPlanner(time_limit=limit).plan(c.problem, c.tiers, c.budget)
        dt = time.perf_counter() - t0
        assert dt < limit + 3.0, f"ILP took {dt:.2f}s with a {limit}s limit"
        assert plan.info["status"] in ("OPTIMAL", "FEASIBLE", "UNKNOWN", "MODEL_TIMEOUT")
        assert validate_plan(c.problem, plan, c.budget, c.tiers) == []
        assert plan.info.get("sim_s", plan.info["greedy_sim_s"]) <= plan.info["greedy_sim_s"] * (1 + 1e-9)
    assert ILPPlanner(time_limit=0.0).plan(c.problem, c.tiers, c.budget).info["status"] == "MODEL_TIMEOUT"


def test_ilp_is_optimal_at_the_tightest_budget_of_a_small_problem():
    """Capacities in slot units (256 B) make the model exact: no INFEASIBLE where greedy fits."""
    from kiln.passes.tiers import smallest_budget
    c = case(300_016, n=99)
    b = smallest_budget(c.problem)
    plan = ILPPlanner(time_limit=5.0).plan(c.problem, c.tiers, b)
    assert plan.info["status"] in ("OPTIMAL", "FEASIBLE")
    assert validate_plan(c.problem, plan, b, c.tiers) == []

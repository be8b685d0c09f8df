"""The RL tier planner (passes/tiers_rl.py): its shipped weights load offline, its plans pass the
planner-independent checker on generated problems and the zoo, it plans a 1,000-step problem
well under a second (checked here with a wide margin for slow CI machines), and the agent's own
plan, not only the greedy safety net's, is what it returns on some problems."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from kiln.passes import tiers_rl
from kiln.passes.tiers import BudgetError, get_planner, validate_plan
from kiln.passes.tiers_gen import case
from models.zoo import build  # the name pytest gives it (see tests/models/zoo.py)
from .common import check_against_graph, planned_graph, smallest_budget

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_shipped_weights_load_and_are_small():
    assert os.path.exists(tiers_rl.WEIGHTS), "passes/data/rl_planner.pt should ship (bench/train_rl_planner.py)"
    assert os.path.getsize(tiers_rl.WEIGHTS) < 512 * 1024
    tiers_rl.load_policy.cache_clear()
    policy = tiers_rl.load_policy()
    assert isinstance(policy, tiers_rl.NumpyPolicy) and policy.layers
    with open(os.path.join(ROOT, "pyproject.toml")) as f:     # a non-editable install carries them
        assert '"kiln.passes" = ["data/*.pt"]' in f.read()


def test_numpy_policy_matches_torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = tiers_rl.make_policy()
    pol = tiers_rl.NumpyPolicy({k: v.numpy() for k, v in model.state_dict().items()})
    rng = np.random.default_rng(0)
    n = len(tiers_rl.Game.LEADS) + 4
    st = rng.normal(size=tiers_rl.N_STATE).astype(np.float32)
    act = rng.normal(size=(n, tiers_rl.N_ACTFEAT)).astype(np.float32)
    legal = rng.random(n) < 0.7
    with torch.no_grad():
        ref = model(torch.from_numpy(tiers_rl.policy_inputs(st, act))).squeeze(-1).numpy()
    z = pol(st, act, legal)
    assert np.allclose(z[legal], ref[legal], atol=1e-5) and np.isneginf(z[~legal]).all()


@pytest.mark.parametrize("seed", [300_000, 300_003, 300_007, 300_011])
def test_rl_plans_valid_on_generated(seed):
    c = case(seed, n=int(np.random.default_rng(seed).integers(30, 200)))
    plan = get_planner("rl").plan(c.problem, c.tiers, c.budget)
    assert validate_plan(c.problem, plan, c.budget, c.tiers) == []
    assert plan.planner == "rl" and plan.info["used"] in ("rl", "greedy")
    assert plan.info["sim_s"] <= plan.info["greedy_sim_s"] * (1 + 1e-9)      # the safety net
    assert np.isfinite(plan.info["agent_sim_s"])                              # the agent's own game
    with pytest.raises(BudgetError):
        get_planner("rl").plan(c.problem, c.tiers, c.problem.min_budget() - 1)


@pytest.mark.parametrize("name", ["mlp", "block", "embed"])
def test_rl_plans_valid_on_zoo(name):
    model, inputs = build(name)
    with pytest.raises(BudgetError) as e:
        planned_graph(model, inputs, target="cpu", memory_budget=1)
    least = smallest_budget(e.value)
    for budget in (least, int(least * 1.5)):
        g = planned_graph(model, inputs, target="cpu", memory_budget=budget, planner="rl")
        plan = g.meta["tier_plan"]
        assert plan.planner == "rl"
        assert validate_plan(g.meta["tier_problem"], plan, budget, g.meta["tier_tiers"]) == []
        check_against_graph(g)
        assert g.meta["cache_schedule"].sim["device_peak"] <= budget


def test_rl_plans_a_1000_step_problem_fast():
    """Under a second on a quiet machine (bench/RESULTS.md); 5 s here for loaded 2-core CI."""
    c = case(311_000 + 1, family="chain", n=1000)          # the bench's slowest ~1,000-step family
    planner = get_planner("rl")
    planner.plan(c.problem, c.tiers, c.budget)             # loads the weights (cached)
    t0 = time.perf_counter()
    plan = planner.plan(c.problem, c.tiers, c.budget)
    dt = time.perf_counter() - t0
    assert c.problem.n_steps >= 1000
    assert validate_plan(c.problem, plan, c.budget, c.tiers) == []
    assert dt < 5.0, f"RL planning took {dt:.2f}s"


def test_agent_plan_is_used_and_beats_greedy_somewhere():
    """The agent's own plan is returned (not the safety net's greedy plan) on some problems and is
    strictly faster than greedy's on at least one."""
    used, better = 0, 0
    for seed in range(300_000, 300_012):
        c = case(seed, n=int(np.random.default_rng(seed).integers(30, 200)))
        plan = get_planner("rl").plan(c.problem, c.tiers, c.budget)
        if plan.info["used"] == "rl":
            used += 1
            better += plan.info["agent_sim_s"] < plan.info["greedy_sim_s"] * (1 - 1e-6)
    assert used >= 3 and better >= 1, (used, better)


def test_missing_weights_fall_back_to_greedy(tmp_path):
    c = case(300_001, n=60)
    planner = get_planner("rl")
    planner.weights = str(tmp_path / "none.pt")
    plan = planner.plan(c.problem, c.tiers, c.budget)
    assert plan.info["used"] == "greedy" and "no policy" in plan.info["reason"]
    assert validate_plan(c.problem, plan, c.budget, c.tiers) == []

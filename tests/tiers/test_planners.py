"""Tier planners (greedy, ILP, the RL game's interface) on the zoo, transformers and generated
problems, inference and training graphs (forward and backward of a step): every plan passes the
planner-independent checker, ILP never simulates slower than greedy, and an impossible budget
fails with the smallest budget that works."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.passes.simulate import PlanningEnv, simulate
from kiln.passes.tiers import (BudgetError, Item, Problem, Tier, get_planner, on_demand, smallest_budget as sb,
                               validate_plan)
from models.zoo import ZOO, build  # the name pytest gives it (see tests/models/zoo.py)
from .common import check_against_graph, planned_graph, smallest_budget, stack, training_graphs, weight_bytes

TIERS = {"device": Tier("device", None, 20e9), "host": Tier("host", None, 8e9)}
PLANNERS = ("greedy", "ilp", "rl")              # every tier planner


def _min_budget(model, inputs) -> int:
    with pytest.raises(BudgetError) as e:
        planned_graph(model, inputs, target="cpu", memory_budget=1)
    return smallest_budget(e.value)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_plans_are_valid(name):
    model, inputs = build(name)
    least = _min_budget(model, inputs)
    for budget in (least, int(least * 1.5)):
        for planner in PLANNERS:
            g = planned_graph(model, inputs, target="cpu", memory_budget=budget, planner=planner)
            problem, plan = g.meta["tier_problem"], g.meta["tier_plan"]
            assert validate_plan(problem, plan, budget, g.meta["tier_tiers"]) == []
            check_against_graph(g)
            assert g.meta["cache_schedule"].sim["device_peak"] <= budget


def test_ilp_never_slower_than_greedy_and_reports_status():
    model, inputs = stack(layers=6)
    budget = int(0.3 * weight_bytes(model))
    g = planned_graph(model, inputs, target="cpu", memory_budget=budget)
    problem, tiers = g.meta["tier_problem"], g.meta["tier_tiers"]
    greedy = get_planner("greedy").plan(problem, tiers, budget)
    ilp = get_planner("ilp").plan(problem, tiers, budget)
    assert validate_plan(problem, ilp, budget, tiers) == []
    assert ilp.info["status"] in ("OPTIMAL", "FEASIBLE")
    assert simulate(problem, ilp, tiers).time_s <= simulate(problem, greedy, tiers).time_s * (1 + 1e-9)


def test_planners_beat_on_demand_when_there_is_room():
    model, inputs = stack(layers=6)
    budget = int(0.3 * weight_bytes(model))
    g = planned_graph(model, inputs, target="cpu", memory_budget=budget)
    problem, plan, tiers = g.meta["tier_problem"], g.meta["tier_plan"], g.meta["tier_tiers"]
    lazy = simulate(problem, on_demand(problem, plan.homes), tiers)
    assert simulate(problem, plan, tiers).time_s < lazy.time_s


def test_impossible_budget_names_the_smallest_that_works():
    model, inputs = stack(layers=4)
    least = _min_budget(model, inputs)
    assert least > 1
    with pytest.raises(BudgetError, match=r"smallest budget that would work is .*use memory_budget >= \d+"):
        planned_graph(model, inputs, target="cpu", memory_budget=least - 256)
    g = planned_graph(model, inputs, target="cpu", memory_budget=least)      # exactly enough
    check_against_graph(g)
    assert sb(g.meta["tier_problem"]) == least


def _hf_model(name):
    """A 2-layer GPT-2, Llama or BERT from a small random config (no download)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfgs = {"gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
                n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)),
            "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
                hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=128, max_position_embeddings=64)),
            "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(
                hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                vocab_size=128, max_position_embeddings=64))}
    return cfgs[name]()


def _transformer_graphs(name):
    from kiln.api import captured_graphs
    torch.manual_seed(0)
    model = _hf_model(name).eval()

    def infer(backend):
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend=backend, dynamic=False)(input_ids=torch.randint(0, 128, (2, 8)))
    return [g for _, g in captured_graphs(infer)]


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_transformers_plans_are_valid(name):
    import kiln
    from kiln.passes import run_pipeline
    for g0 in _transformer_graphs(name):
        with pytest.raises(BudgetError) as e:
            run_pipeline(g0, kiln.Options.make(target="cpu", memory_budget=1))
        least = smallest_budget(e.value)
        for planner in PLANNERS:
            g = run_pipeline(g0, kiln.Options.make(target="cpu", memory_budget=least, planner=planner))[0]
            assert g.meta["tier_problem"].items, "the parameters should be planned"
            assert validate_plan(g.meta["tier_problem"], g.meta["tier_plan"], least, g.meta["tier_tiers"]) == []
            check_against_graph(g)


def _plans_valid_from_least(g0) -> int:
    """Plan a captured graph at the smallest budget its BudgetError names and 1.5x that, with
    every planner; every plan valid, checked against the graph, within the budget."""
    import kiln
    from kiln.passes import run_pipeline
    with pytest.raises(BudgetError) as e:
        run_pipeline(g0, kiln.Options.make(target="cpu", memory_budget=1))
    least = smallest_budget(e.value)
    for budget in (least, int(least * 1.5)):
        for planner in PLANNERS:
            g = run_pipeline(g0, kiln.Options.make(target="cpu", memory_budget=budget, planner=planner))[0]
            problem, plan = g.meta["tier_problem"], g.meta["tier_plan"]
            assert validate_plan(problem, plan, budget, g.meta["tier_tiers"]) == []
            check_against_graph(g)
            assert g.meta["cache_schedule"].sim["device_peak"] <= budget
            assert set(problem.spills) <= set(problem.spillable)
    with pytest.raises(BudgetError, match=f"use memory_budget >= {least}"):
        run_pipeline(g0, kiln.Options.make(target="cpu", memory_budget=least - 1))
    return least


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_training_plans_are_valid(name):
    """The forward and backward of a training step: the backward's weights (the saved
    parameters and views of them) are planned items, not inputs held on the device."""
    model, inputs = build(name)
    graphs = training_graphs(model, inputs)
    assert [k for k, _ in graphs] == ["forward", "backward"]
    for kind, g0 in graphs:
        _plans_valid_from_least(g0)
    bw = graphs[1][1]
    assert bw.meta["weight_inputs"], "the backward reads the weights"


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_transformers_training_plans_are_valid(name):
    torch.manual_seed(0)
    graphs = training_graphs(_hf_model(name), (), {"input_ids": torch.randint(0, 128, (2, 8))})
    assert {"forward", "backward"} <= {k for k, _ in graphs}
    for kind, g0 in graphs:
        if kind == "backward":
            assert g0.meta["weight_inputs"]
        _plans_valid_from_least(g0)


# ---- generated problems and the placement game ---------------------------------------------------
def generated(seed: int, n: int = 60, k: int = 12) -> Problem:
    rng = np.random.default_rng(seed)
    items = []
    for j in range(k):
        uses = sorted(rng.choice(n, size=int(rng.integers(1, 4)), replace=False))
        segs = [(int(u), int(min(u + rng.integers(0, 3), n - 1))) for u in uses]
        merged = []
        for a, b in segs:
            if merged and a <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
            else:
                merged.append((a, b))
        items.append(Item(f"w{j}", int(rng.integers(1, 8)) * 4096, merged))
    return Problem(n, items, list(rng.uniform(1e-6, 5e-6, n)), [8192] * n)


@pytest.mark.parametrize("seed", range(4))
def test_generated_problems(seed):
    p = generated(seed)
    budget = sb(p) + 16 * 4096
    for name in ("greedy", "ilp"):
        plan = get_planner(name).plan(p, TIERS, budget)
        assert validate_plan(p, plan, budget, TIERS) == []
    with pytest.raises(BudgetError):
        get_planner("greedy").plan(p, TIERS, p.min_budget() - 1)


def test_placement_game_plays_to_valid_plans():
    p = generated(7)
    budget = sb(p) + 8 * 4096
    env = PlanningEnv(p, TIERS, budget)
    rng = np.random.default_rng(0)
    for policy in ("on_demand", "random"):
        state, done, reward = env.reset(), False, 0.0
        assert state["legal"] and env.features().shape == env.features().shape
        while not done:
            legal = env.legal_actions()
            act = 1 if policy == "on_demand" else int(rng.choice(legal))
            assert act in legal
            state, reward, done, info = env.step(act)
        assert not info.get("overflow") and reward < 0
        assert validate_plan(p, info["plan"], budget, TIERS) == []
        assert reward == pytest.approx(-simulate(p, info["plan"], TIERS).time_s)
    env.reset()                        # an illegal action ends the game with the failure penalty
    bad = next(a for a in range(env.n_actions) if a not in env.legal_actions())
    _, r, done, info = env.step(bad)
    assert done and info["overflow"] and r == -env.fail_penalty


def test_unknown_planner_falls_back_to_greedy():
    """A planner name nothing registers (the RL planner registers "rl" from passes/tiers_rl.py)."""
    p = generated(1)
    with pytest.warns(UserWarning, match="greedy"):
        planner = get_planner("no_such_planner")
    plan = planner.plan(p, TIERS, sb(p))
    assert validate_plan(p, plan, sb(p), TIERS) == []

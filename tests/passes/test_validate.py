"""The independent plan validator: it catches planted bad plans, and the plans of all three
planners are valid on every zoo model and on transformers models (inference and training)."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import kiln
from kiln.passes.memory import ALIGN, Buffer, plan_memory
from kiln.passes.pipeline import run_pipeline
from kiln.passes.validate import PlanError, check_plan, validate_plan
from memory_graphs import model_graphs, transformers_models, zoo


def _mlp(x, w1, w2, w3):
    h = torch.relu(x @ w1)
    h = torch.sigmoid(h * 2.0 + 1.0)
    return (h @ w2).tanh() @ w3


@functools.lru_cache(maxsize=None)
def _planned(name: str, train: bool):
    """Scheduled, planned graphs (greedy) of a model; cached across tests."""
    out = []
    for kind, g in model_graphs(name, train):
        g2, _ = run_pipeline(g, kiln.Options(target="cpu"), verify=True)
        out.append((kind, g2))
    return out


def _mlp_graph():
    from test_memory import _compiled_graph, _mlp_args
    return _compiled_graph(_mlp, _mlp_args())


def _two_live(plan):
    """Two buffers live at the same step."""
    bs = list(plan.buffers.values())
    for a in bs:
        for b in bs:
            if a is not b and not (a.end < b.start or b.end < a.start):
                return a, b
    raise AssertionError("no two buffers live at once")


def test_valid_plan_passes():
    g = _mlp_graph()
    assert validate_plan(g, g.meta["memory_plan"]) == []
    check_plan(g)


def test_overlap_is_caught():
    g = _mlp_graph()
    plan = copy.deepcopy(g.meta["memory_plan"])
    a, b = _two_live(plan)
    b.offset = a.offset
    errs = validate_plan(g, plan)
    assert any("overlap while both are live" in e for e in errs), errs
    with pytest.raises(PlanError, match="overlap"):
        check_plan(g, plan)


def test_too_small_is_caught():
    g = _mlp_graph()
    plan = copy.deepcopy(g.meta["memory_plan"])
    b = next(iter(plan.buffers.values()))
    b.nbytes -= 4
    assert any("spans" in e and b.name in e for e in validate_plan(g, plan))


def test_misaligned_and_outside_arena_are_caught():
    g = _mlp_graph()
    plan = copy.deepcopy(g.meta["memory_plan"])
    b = max(plan.buffers.values(), key=lambda b: b.offset)
    b.offset += ALIGN // 2
    errs = validate_plan(g, plan)
    assert any("multiple of" in e for e in errs) and any("exceed the arena" in e for e in errs), errs


def test_capacity_is_checked():
    g = _mlp_graph()
    plan = g.meta["memory_plan"]
    assert validate_plan(g, plan, capacity=plan.arena_bytes) == []
    assert any("capacity" in e for e in validate_plan(g, plan, capacity=plan.arena_bytes - 1))


def test_escaping_and_short_intervals_are_caught():
    g = _mlp_graph()
    plan = copy.deepcopy(g.meta["memory_plan"])
    out = g.output_values()[0]
    i = next(k for k, n in enumerate(g.nodes) if out in n.outputs)
    plan.buffers[out.name] = Buffer(out.name, out.type.storage_bytes, i, i, plan.arena_bytes)
    plan.arena_bytes += -(-out.type.storage_bytes // ALIGN) * ALIGN
    assert any("graph output" in e for e in validate_plan(g, plan))
    plan = copy.deepcopy(g.meta["memory_plan"])
    b = max(plan.buffers.values(), key=lambda b: b.end - b.start)
    b.end = b.start
    assert any("live steps" in e for e in validate_plan(g, plan))


def test_bad_in_place_alias_is_caught():
    """An output written over a buffer that is still read later."""
    g = _mlp_graph()
    plan = copy.deepcopy(g.meta["memory_plan"])
    a, b = _two_live(plan)
    late, early = (a, b) if a.start > b.start else (b, a)
    del plan.buffers[late.name]
    plan.aliases[late.name] = early.name
    if late.end > early.end:
        early.end = late.end
    assert any("overlap" in e for e in validate_plan(g, plan))


MODELS = list(zoo()[0]) + list(transformers_models())


@pytest.mark.parametrize("train", [False, True], ids=["inference", "train"])
@pytest.mark.parametrize("name", MODELS)
def test_all_planners_valid(name, train):
    for kind, g in _planned(name, train):
        plans = {p: plan_memory(g, kiln.Options(target="cpu", planner=p, ilp_time_limit=0.5)).meta["memory_plan"]
                 for p in ("greedy", "ilp", "rl")}
        for p, plan in plans.items():
            errs = validate_plan(g, plan)
            assert errs == [], f"{name} {kind} {p}: {errs[:3]}"
            assert plan.arena_bytes >= plan.peak_bytes
        assert plans["ilp"].arena_bytes <= plans["greedy"].arena_bytes
        assert plans["rl"].arena_bytes == plans["greedy"].arena_bytes

"""The CP-SAT arena planner: optimal on tiny cases (checked against exhaustive search), never
larger than greedy-by-size, and back within its time limit on large ones."""
from __future__ import annotations

import copy
import random
import time

import pytest

import kiln
from kiln.passes.memory import ALIGN, Buffer, greedy_by_size, peak_live_bytes, plan_buffers


def _bufs(spec) -> dict[str, Buffer]:
    """spec: (size in ALIGN units, first step, last step) per buffer."""
    return {f"b{i}": Buffer(f"b{i}", ALIGN * s, a, b) for i, (s, a, b) in enumerate(spec)}


def _overlaps(bufs) -> list:
    bs = list(bufs.values())
    return [(a.name, b.name) for i, a in enumerate(bs) for b in bs[i + 1:]
            if not (a.end < b.start or b.end < a.start)
            and a.offset < b.offset + b.nbytes and b.offset < a.offset + a.nbytes]


def _exhaustive(bufs) -> int:
    """Smallest arena over all aligned offsets (backtracking; tiny inputs only)."""
    bs = sorted(bufs.values(), key=lambda b: -b.nbytes)
    best = [sum(-(-b.nbytes // ALIGN) * ALIGN for b in bs) + 1]     # above stacking them all
    offs: list[int] = []

    def go(i, top):
        if top >= best[0]:
            return
        if i == len(bs):
            best[0] = top
            return
        b = bs[i]
        for k in range(0, best[0] // ALIGN + 1):
            o = k * ALIGN
            if o + b.nbytes >= best[0]:
                break
            if all(p.end < b.start or b.end < p.start or o + b.nbytes <= po or po + p.nbytes <= o
                   for p, po in zip(bs, offs)):
                offs.append(o)
                go(i + 1, max(top, o + b.nbytes))
                offs.pop()
    go(0, 0)
    return best[0]


def test_ilp_beats_greedy_on_known_case():
    """Greedy-by-size places the two 4-unit buffers on top of each other's neighbours and needs
    7 units; 6 (the peak of live bytes) is achievable."""
    spec = [(2, 3, 4), (4, 4, 4), (1, 0, 3), (4, 1, 1), (1, 0, 2)]
    g = copy.deepcopy(_bufs(spec))
    assert greedy_by_size(g) == 7 * ALIGN
    plan = plan_buffers(_bufs(spec), "ilp", time_limit=5.0)
    assert plan.arena_bytes == 6 * ALIGN == plan.peak_bytes
    assert plan.greedy_bytes == 7 * ALIGN and plan.status == "optimal" and plan.planner == "ilp"
    assert _overlaps(plan.buffers) == []


@pytest.mark.parametrize("seed", range(12))
def test_ilp_matches_exhaustive_search(seed):
    rng = random.Random(seed)
    spec = []
    for _ in range(rng.randint(3, 6)):
        a = rng.randint(0, 5)
        spec.append((rng.randint(1, 4), a, rng.randint(a, 6)))
    want = _exhaustive(_bufs(spec))
    plan = plan_buffers(_bufs(spec), "ilp", time_limit=5.0)
    assert plan.arena_bytes == want, spec
    assert plan.status == "optimal"
    assert plan.arena_bytes <= plan.greedy_bytes
    assert _overlaps(plan.buffers) == []


def test_ilp_not_aligned_sizes():
    """Sizes that are not ALIGN multiples: the unit model must stay exact."""
    spec = [(100, 0, 2), (70, 1, 3), (64, 2, 2), (1, 0, 3), (129, 3, 4)]
    bufs = {f"b{i}": Buffer(f"b{i}", n, a, b) for i, (n, a, b) in enumerate(spec)}
    plan = plan_buffers(copy.deepcopy(bufs), "ilp", time_limit=5.0)
    assert plan.arena_bytes == _exhaustive(bufs)
    assert all(b.offset % ALIGN == 0 for b in plan.buffers.values())
    assert _overlaps(plan.buffers) == []


def test_time_limit_on_a_large_instance():
    rng = random.Random(0)
    spec = []
    for _ in range(400):
        a = rng.randint(0, 300)
        spec.append((rng.randint(1, 64), a, min(300, a + rng.randint(0, 30))))
    bufs = _bufs(spec)
    t0 = time.perf_counter()
    plan = plan_buffers(bufs, "ilp", time_limit=0.5)
    assert time.perf_counter() - t0 < 10
    assert plan.peak_bytes <= plan.arena_bytes <= plan.greedy_bytes
    assert plan.status in ("optimal", "improved", "greedy")
    assert _overlaps(plan.buffers) == []
    assert peak_live_bytes(bufs) == plan.peak_bytes


def test_ilp_time_limit_option_is_validated():
    assert kiln.Options(planner="ilp", ilp_time_limit=0.25).ilp_time_limit == 0.25
    for bad in (0, -1, "2s", True):
        with pytest.raises(ValueError, match="ilp_time_limit"):
            kiln.Options(ilp_time_limit=bad)

"""Random tier-planning problems, for training the RL planner and for benchmarking all three.

Families mimic what build_problem makes of real graphs: ``stack`` (transformer-like layers:
norms, attention projections, an MLP; a tied embedding read at both ends; inference reads each
weight once, training again in reverse in the backward with activations rising then falling),
``chain`` (one weight per step, sizes log-uniform), ``branch`` (weights read at a few random
places, views spanning a few steps: reuse). Compute per step is the step's weight bytes at a
random arithmetic intensity (decode-like: transfer-bound; prefill-like: compute-bound), and
budgets are drawn between the smallest that works and everything on the device. Everything is
seeded: ``case(seed)`` is the same problem on every machine."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tiers import Item, Problem, Tier, smallest_budget

FAMILIES = ("stack", "chain", "branch")
BANDWIDTH = {"cpu": {"device": 20e9, "host": 8e9, "disk": 1.5e9},
             "cuda": {"device": 2.0e12, "host": 25e9, "disk": 2e9}}


@dataclass
class Case:
    name: str
    problem: Problem
    tiers: dict
    budget: int


def _round(x: float) -> int:
    return max(256, int(x) // 256 * 256)


def _compute(rng, weight_bytes: np.ndarray, host_bw: float, intensity: float) -> list[float]:
    """Step seconds: reading the step's weights from the host would take ``bytes / host_bw``;
    compute is ``intensity`` times that (0.05: decode, 5: prefill) with noise, plus a floor."""
    base = np.maximum(weight_bytes, rng.uniform(2e3, 3e4, len(weight_bytes))) / host_bw
    return [float(x) for x in base * intensity * rng.lognormal(0.0, 0.3, len(base)) + 2e-6]


def stack(rng, layers: int, training: bool, d: int) -> tuple[list, list, np.ndarray]:
    """Steps and weights of a transformer-like stack: (items, fixed bytes, weight bytes per step)."""
    w = 4 * d * d * 4                                       # one d x d fp32 projection, x4 (qkv+o scale)
    kinds = [("ln1", d * 8), ("qkv", 3 * w // 4), ("attn", 0), ("softmax", 0), ("av", 0), ("proj", w // 4),
             ("ln2", d * 8), ("fc1", w), ("act", 0), ("fc2", w), ("res", 0)]
    steps, uses = [], {}                                    # step -> weight name
    vocab = int(d * rng.integers(8, 64)) * d * 4
    steps.append(("embed", "emb", vocab))
    for li in range(layers):
        for k, nb in kinds:
            steps.append((k, f"l{li}.{k}" if nb else None, nb))
    steps.append(("head", "emb", vocab))                   # tied: read at both ends
    fwd = len(steps)
    if training:                                            # backward: reverse, each weight read again
        steps += [(f"d{k}", name, nb) for k, name, nb in reversed(steps)]
    n = len(steps)
    for i, (_, name, nb) in enumerate(steps):
        if name:
            uses.setdefault(name, (nb, []))[1].append(i)
    items = []
    for name, (nb, at) in uses.items():
        segs = []
        for u in sorted(at):
            if segs and u <= segs[-1][1] + 1:
                segs[-1] = (segs[-1][0], u)
            else:
                segs.append((u, u))
        items.append(Item(name, int(nb), segs))
    act = float(rng.uniform(0.02, 0.3)) * w / 4             # activation bytes kept per forward step
    if training:
        live = np.concatenate([np.arange(fwd), np.arange(fwd)[::-1]]) * act
    else:
        live = np.full(n, 3 * act)
    wb = np.array([nb for _, _, nb in steps], dtype=float)
    return items, [_round(x) for x in live + 64 * 1024], wb


def chain(rng, n: int) -> tuple[list, list, np.ndarray]:
    sizes = np.exp(rng.uniform(np.log(4e3), np.log(4e6), n))
    items = [Item(f"w{i}", _round(s), [(i, i)]) for i, s in enumerate(sizes) if rng.random() < 0.8]
    wb = np.zeros(n)
    for it in items:
        wb[it.segments[0][0]] = it.nbytes
    return items, [_round(rng.uniform(1e5, 1e6))] * n, wb


def branch(rng, n: int) -> tuple[list, list, np.ndarray]:
    k = max(2, int(n * rng.uniform(0.15, 0.5)))
    items, wb = [], np.zeros(n)
    for j in range(k):
        nb = _round(np.exp(rng.uniform(np.log(4e3), np.log(4e6))))
        reuse = int(rng.choice([1, 1, 2, 3, 4, 6]))
        span = int(rng.integers(n // 8 + 1, n + 1))        # reuses cluster (a branch, a loop body)
        lo = int(rng.integers(0, max(n - span, 0) + 1))
        uses = sorted(set(int(u) for u in rng.integers(lo, lo + span, reuse)))
        segs = []
        for u in uses:
            b = min(u + int(rng.choice([0, 0, 0, 1, 2])), n - 1)   # views read over a few steps
            if segs and u <= segs[-1][1] + 1:
                segs[-1] = (segs[-1][0], max(b, segs[-1][1]))
            else:
                segs.append((u, b))
        items.append(Item(f"w{j}", nb, segs))
        for a, b in segs:
            wb[a:b + 1] += nb / (b - a + 1)
    live = np.cumsum(rng.normal(0, 2e4, n))
    return items, [_round(x) for x in live - live.min() + 1e5], wb


def case(seed: int, family: str | None = None, n: int | None = None, device: str | None = None) -> Case:
    """One seeded problem with tiers and a budget. ``n`` is the rough number of steps."""
    rng = np.random.default_rng(seed)
    family = family or FAMILIES[int(rng.integers(len(FAMILIES)))]
    device = device or ("cpu", "cuda")[int(rng.integers(2))]
    n = n or int(np.exp(rng.uniform(np.log(30), np.log(400))))
    if family == "stack":
        training = bool(rng.random() < 0.5)
        layers = max(1, round(n / (11 * (2 if training else 1))))
        items, fixed, wb = stack(rng, layers, training, int(rng.choice([32, 64, 128, 256])))
    elif family == "chain":
        items, fixed, wb = chain(rng, n)
    else:
        items, fixed, wb = branch(rng, n)
    bw = BANDWIDTH[device]
    intensity = float(np.exp(rng.uniform(np.log(0.03), np.log(8.0))))
    prob = Problem(len(fixed), items, _compute(rng, wb, bw["host"], intensity), fixed, device)
    tiers = {k: Tier(k, None, v) for k, v in bw.items() if k != "disk"}
    if rng.random() < 0.25:                 # some weights spill to disk
        tiers["disk"] = Tier("disk", None, bw["disk"])
        tiers["host"] = Tier("host", _round(sum(it.nbytes for it in items) * rng.uniform(0.5, 0.9)), bw["host"])
    lo = smallest_budget(prob)
    hi = max(prob.fixed_bytes) + sum(it.padded for it in items)
    frac = float(rng.uniform(0.0, 0.8)) ** 1.5             # most budgets are tight
    budget = _round(lo + frac * max(hi - lo, 0)) + 256
    return Case(f"{family}-{device}-n{len(fixed)}-s{seed}", prob, tiers, max(budget, lo))


def cases(seeds, **kw) -> list[Case]:
    return [case(s, **kw) for s in seeds]

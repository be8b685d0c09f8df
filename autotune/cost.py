"""Analytic cost model: predicts a config's time so that only the most promising few are timed.

    time = launch + max(memory, compute) + waves * per-wave overhead

memory  = bytes moved / achieved bandwidth, where achieved bandwidth follows Little's law: the
          device needs bandwidth x latency bytes outstanding, and gets concurrent programs x the
          bytes each keeps in flight (occupancy and grid size both matter here);
compute = flops / peak, divided by the fraction of the last wave's slots that are busy (tail);
waves   = programs / (SMs x resident programs per SM): many tiny programs pay their start-up.

It ranks, it does not predict absolute times well; measurement (measure.py) decides among the
top k. Swappable: anything with ``rank(configs, problem, limits) -> list`` works for the tuner.
"""
from __future__ import annotations

import math

from .space import Config, DeviceLimits, Estimate, Problem, space_for

LAUNCH_S = 3e-6          # host launch + grid start
PER_WAVE_S = 4e-7        # program start, index math, tail of each wave


def predict(e: Estimate, limits: DeviceLimits) -> float:
    """Seconds for one launch with these resources (inf when nothing fits on an SM)."""
    per_sm = limits.blocks_per_sm(e)
    if per_sm < 1:
        return math.inf
    slots = limits.sm_count * per_sm
    waves = math.ceil(max(e.programs, 1) / slots)
    concurrent = min(max(e.programs, 1), slots)
    needed = limits.bandwidth * limits.mem_latency_s
    achieved_bw = limits.bandwidth * min(1.0, concurrent * e.inflight_bytes / needed) if e.inflight_bytes else limits.bandwidth
    t_mem = e.bytes_moved / max(achieved_bw, 1.0)
    busy = max(e.programs, 1) / (waves * slots)
    t_comp = e.flops / (limits.peak_flops * busy)
    return LAUNCH_S + max(t_mem, t_comp) + waves * PER_WAVE_S


def rank(configs: list[Config], problem: Problem, limits: DeviceLimits) -> list[tuple[Config, float]]:
    """Configs with their predicted seconds, fastest first (stable for ties)."""
    est = space_for(problem.family).estimate
    scored = [(c, predict(est(c, problem), limits)) for c in configs]
    return sorted(scored, key=lambda cs: cs[1])

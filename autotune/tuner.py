"""The tuner ties the parts together: database hit -> done; otherwise prune the family's space
(space.py), rank what is left with the cost model (cost.py), time the top k and the heuristic
default (measure.py) and append every measurement to the database (database.py), so a second
compile, in this process or another, does not tune again.

``tune`` is the core (every part passed in, so tests use fakes); ``tune_launch`` is what a kernel
launcher calls with its tensors: it builds the key from the source and the tensors' shapes,
dtypes and device, and uses the SQLite database of the cache directory and the real GPU timer.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from . import cost
from .database import Database, TuningKey, open_database
from .measure import Timer, time_gpu
from .space import Config, DeviceLimits, Problem, prune

log = logging.getLogger("kiln.autotune")

TOP_K = 8


@dataclass
class TuneResult:
    config: dict
    ms: float | None                # measured time of the winner (None: nothing could be timed)
    seconds: float                  # wall time spent tuning (0 on a database hit)
    cached: bool                    # came from the database
    candidates: int = 0             # configs in the space
    pruned: dict = field(default_factory=dict)   # rule -> configs it removed
    timed: int = 0


def tune(problem: Problem, run: Callable[[dict], object], key: TuningKey, db: Database,
         limits: DeviceLimits | None = None, timer: Timer | None = None, top_k: int = TOP_K,
         baseline: dict | None = None) -> TuneResult:
    """``run(config_dict)`` launches once with that config. Returns the best config found."""
    hit = db.best(key)
    if hit is not None:
        return TuneResult(hit[0], hit[1], 0.0, True)
    t0 = time.perf_counter()
    limits = limits or DeviceLimits()
    timer = timer or time_gpu
    kept, removed = prune(problem, limits)
    ranked = [c for c, _ in cost.rank(kept, problem, limits)]
    chosen = ranked[:top_k]
    if baseline is not None and Config.from_dict(baseline) not in chosen:
        chosen.append(Config.from_dict(baseline))
    measured, errors = [], []
    for cfg in chosen:
        d = cfg.as_dict()
        try:
            ms = float(timer(lambda d=d: run(d)))
        except Exception as e:      # noqa: BLE001 - a config the compiler rejects (resources) is skipped
            log.debug("config %s failed: %s", d, e)
            errors.append(f"{type(e).__name__}: {e}")
            continue
        if math.isfinite(ms):
            measured.append((d, ms))
    secs = time.perf_counter() - t0
    n = len(kept) + sum(removed.values())
    if not measured:
        fallback = baseline or (chosen[0].as_dict() if chosen else {})
        log.warning("no launch config of %s %s could be timed (%s); keeping %s", problem.family, problem.dims,
                    errors[0][:300] if errors else "no candidates", fallback)
        return TuneResult(fallback, None, secs, False, n, removed, 0)
    db.commit(key, measured, secs)
    best, best_ms = min(measured, key=lambda m: m[1])
    log.info("tuned %s %s: %d configs, %d pruned, %d timed in %.2fs -> %s (%.4f ms)", problem.family,
             problem.dims, n, sum(removed.values()), len(measured), secs, best, best_ms)
    return TuneResult(best, best_ms, secs, False, n, removed, len(measured))


_LIMITS: dict = {}


def device_limits(device) -> DeviceLimits:
    import torch
    idx = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    if idx not in _LIMITS:
        _LIMITS[idx] = DeviceLimits.of(idx)
    return _LIMITS[idx]


def tune_launch(source: str, problem: Problem, tensors: list, run: Callable[[dict], object], cache_dir: str,
                baseline: dict | None = None, timer: Timer | None = None, db: Database | None = None) -> TuneResult:
    """Tune a kernel on ``tensors`` (its inputs and outputs, on the GPU): key from the source and
    the tensors, the cache directory's database, the device's limits."""
    import torch
    dev = next((t.device for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda), None)
    if dev is None:
        raise ValueError("tune_launch needs CUDA tensors; kernels on the CPU or the Triton interpreter are not tuned")
    limits = device_limits(dev)
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    key = TuningKey.make(source, [t.shape for t in ts], [t.dtype for t in ts], limits.name)
    with torch.cuda.device(dev):
        return tune(problem, run, key, db or open_database(cache_dir), limits, timer, baseline=baseline)


def loop_problem(kind: str, xnumel: int, rnumel: int, one_pass: bool, tensors: list, n_inputs: int) -> Problem:
    """The Problem of a loop kernel (kiln.fused group) launched on ``tensors`` (inputs first)."""
    import torch
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    nbytes = sum(t.numel() * t.element_size() for t in ts)
    dtype = max((t.dtype for t in ts if t.is_floating_point()), key=lambda d: torch.finfo(d).bits,
                default=torch.float32)
    family = "pointwise" if kind == "pointwise" else "reduction"
    return Problem(family, {"x": int(xnumel), "r": int(rnumel)}, dtype,
                   {"bytes": nbytes, "one_pass": bool(one_pass), "live": 1 + min(n_inputs, 5)})

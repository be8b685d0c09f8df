"""The simulator on hand-computed timelines (1 B/s channels, 1 s steps), and against real runs
of the CPU runtime on a transfer-bound graph."""
from __future__ import annotations

import time

import pytest
import torch

from kiln.passes.simulate import CapacityError, simulate
from kiln.passes.tiers import Item, Problem, Stay, Tier, TierPlan

T = {"device": Tier("device", None, 1.0), "host": Tier("host", None, 1.0), "disk": Tier("disk", None, 0.5)}


def prob(device="cuda", n=3, nbytes=1, dirty=False):
    return Problem(n, [Item("w", nbytes, [(n - 1, n - 1)], dirty=dirty)], [1.0] * n, [0] * n, device)


def plan(load, first=2, evict=2, home="host"):
    return TierPlan({"w": home}, [Stay("w", load, first, evict)])


def test_prefetch_hides_the_copy():
    # copy [0, 1] while steps 0 and 1 run: no stall, 3 s
    r = simulate(prob(), plan(0), T)
    assert r.time_s == pytest.approx(3.0) and r.stall_s == pytest.approx(0.0)
    assert r.transfer_bytes == 1 and r.transfers[0]["start"] == 0.0 and r.transfers[0]["end"] == 1.0


def test_on_demand_load_stalls():
    # issued before step 2: waits for step 1 to free memory (end 2), lands at 3, step 2 runs [3, 4]
    r = simulate(prob(), plan(2), T)
    assert r.time_s == pytest.approx(4.0) and r.stall_s == pytest.approx(1.0)


def test_packed_wait_and_cpu_host_sync():
    # with a packed slot that is free from the start, a CUDA copy issued at step 1 starts at 0...
    assert simulate(prob(), plan(1), T, waits={0: -1}).time_s == pytest.approx(3.0)
    # ...but on the CPU the host issues it only when it reaches step 1 (t = 1): lands at 2, no stall
    assert simulate(prob("cpu"), plan(1), T, waits={0: -1}).time_s == pytest.approx(3.0)
    # a 2-byte copy issued at step 1 on the CPU: lands at 3, step 2 runs [3, 4]
    assert simulate(prob("cpu", nbytes=2), plan(1), T, waits={0: -1}).time_s == pytest.approx(4.0)


def test_disk_reads_feed_the_copy_stream():
    # CUDA: disk read 2 s (0.5 B/s), then the host->device copy 1 s: lands at 3, step 2 at [3, 4]
    assert simulate(prob(), plan(0, home="disk"), T).time_s == pytest.approx(4.0)
    # CPU: one read from the memory-mapped file straight into the device arena, 2 s
    assert simulate(prob("cpu"), plan(0, home="disk"), T).time_s == pytest.approx(3.0)


def test_persistent_and_writeback_and_overflow():
    r = simulate(prob(), plan(-1, evict=2), T)
    assert r.time_s == pytest.approx(3.0) and r.transfer_bytes == 0 and r.warmup_bytes == 1
    p = Problem(4, [Item("a", 1, [(0, 0), (3, 3)], kind="activation", dirty=True)], [1.0] * 4, [0] * 4, "cuda")
    stays = [Stay("a", 0, 0, 0), Stay("a", 2, 3, 3)]
    r = simulate(p, TierPlan({"a": "host"}, stays), T)
    # written back after step 0 ([1, 2]), reloaded at step 2 behind it ([2, 3]): no stall; one write-back only
    assert r.writeback_bytes == 1 and r.transfer_bytes == 2 and r.time_s == pytest.approx(4.0)
    assert r.peak["device"] == 256                 # one slot (slots are 256-byte aligned)
    with pytest.raises(CapacityError, match="overflows the device budget"):
        simulate(prob(nbytes=1024), plan(0), T, budget=512)


# ---- against real runs on the CPU -----------------------------------------------------------------
class Lookups(torch.nn.Module):
    """Embedding lookups: the whole table must reach the device, the op reads a few rows of it."""
    def __init__(self, n=6, rows=20000, d=64):
        super().__init__()
        self.tables = torch.nn.ModuleList(torch.nn.Embedding(rows, d) for _ in range(n))

    def forward(self, ids):
        h = self.tables[0](ids)
        for t in self.tables[1:]:
            h = torch.tanh(h + t(ids))
        return h


def test_simulator_matches_cpu_runs_when_transfer_bound():
    """The simulator fed what the hardware did (step times from a run with every weight kept on
    the device, copy bandwidth from the streamed run's own copies) predicts the streamed run's
    time within 50% (the suite runs two workers on two cores, and the other one perturbs the
    timed runs; 0.37 was seen that way): what it models is the overlap and the stalls."""
    from kiln.aot import compile_ahead
    from kiln.passes.cache_schedule import build_schedule
    from kiln.passes.tiers import Tier
    from .common import weight_bytes
    torch.manual_seed(0)
    model, ids = Lookups().eval(), torch.randint(0, 20000, (2, 8))
    wb = weight_bytes(model)                               # 29 MiB of tables
    with torch.no_grad():
        resident, _ = compile_ahead(model, (ids,), {"target": "cpu", "memory_budget": 4 * wb})
        streamed, _ = compile_ahead(model, (ids,), {"target": "cpu", "memory_budget": int(0.3 * wb)})
        torch.testing.assert_close(streamed(ids)[0], model(ids))
        resident(ids)
        g = streamed.graph
        problem, plan = g.meta["tier_problem"], g.meta["tier_plan"]
        errors = []
        for _ in range(6):      # a shared machine is noisy: best of six (of three, one full-suite run in ~6 failed)
            resident._tiers.trace = []
            resident(ids)
            steps = {i: e - s for i, s, e in resident._tiers.trace}
            rt = streamed._tiers
            rt.trace, rt.copies = [], []
            t0 = time.perf_counter()
            streamed(ids)
            real = time.perf_counter() - t0
            moved = sum(rt.s.slots[k].nbytes for k, _, _ in rt.copies)
            bw = moved / sum(e - s for _, s, e in rt.copies)
            problem.compute_s = [steps[i] for i in range(problem.n_steps)]
            tiers = {"device": Tier("device", None, bw), "host": Tier("host", None, bw)}
            sched = build_schedule(problem, plan, tiers, g.meta["tier_budget"])
            predicted = sched.sim["time_s"]
            assert moved > 0.5 * wb and sched.sim["stall_s"] > 0.5 * predicted      # transfer-bound
            errors.append(abs(real - predicted) / predicted)
            if errors[-1] < 0.5:
                break
    assert min(errors) < 0.5, errors

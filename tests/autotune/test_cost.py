"""The cost model ranks sensibly: it does not need exact times, only the right order at the ends."""
import torch

from kiln.autotune import cost
from kiln.autotune.space import Config, DeviceLimits, Estimate, Problem, prune

H100 = DeviceLimits()


def test_more_bytes_cost_more():
    a = Estimate(programs=10000, threads=128, bytes_moved=1e8, inflight_bytes=8192)
    b = Estimate(programs=10000, threads=128, bytes_moved=2e8, inflight_bytes=8192)
    assert cost.predict(a, H100) < cost.predict(b, H100)


def test_few_programs_starve_bandwidth():
    """The same bytes spread over 8 programs cannot keep enough loads in flight."""
    few = Estimate(programs=8, threads=128, bytes_moved=1e8, inflight_bytes=8192)
    many = Estimate(programs=8192, threads=128, bytes_moved=1e8, inflight_bytes=8192)
    assert cost.predict(many, H100) < cost.predict(few, H100) / 4


def test_memory_bound_time_near_roofline():
    e = Estimate(programs=65536, threads=128, bytes_moved=3e9, inflight_bytes=6144)
    t = cost.predict(e, H100)
    assert 1.0 <= t / (3e9 / H100.bandwidth) < 1.2


def test_pointwise_ranking():
    n = 1 << 26
    p = Problem("pointwise", {"x": n, "r": 1}, torch.bfloat16, {"bytes": 3 * 2 * n})
    kept, _ = prune(p, H100)
    ranked = cost.rank(kept, p, H100)
    assert [t for _, t in ranked] == sorted(t for _, t in ranked)
    assert ranked[0][0]["XBLOCK"] >= 512                # big blocks first
    worst = ranked[-1][0]                               # one element per thread: many short programs
    assert worst["XBLOCK"] == 32 * worst.num_warps and ranked[-1][1] > 1.5 * ranked[0][1]


def test_reduction_prefers_spreading_over_sms():
    """64 long rows: one row per program (64 programs) beats 4 rows per program (16 programs)."""
    p = Problem("reduction", {"x": 64, "r": 100000}, torch.float32, {"bytes": 4 * 64 * 100000, "one_pass": False})
    one = Config.make({"XBLOCK": 1, "RBLOCK": 4096}, 8)
    four = Config.make({"XBLOCK": 4, "RBLOCK": 1024}, 8)
    ranked = [c for c, _ in cost.rank([four, one], p, H100)]
    assert ranked == [one, four]

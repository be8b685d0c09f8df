"""Config spaces: the launch configs a kernel family may use, and which of them a device can run.

The "space" part of the tuner (TVM MetaSchedule's split: space / cost model / measure / database).
A family is registered once as a ``Space`` of three parts:

    candidates(problem)      -> iterable of Config        the raw grid (block sizes, warps, stages ...)
    estimate(config, problem) -> Estimate                 resources and work of one config
    rules                    -> ((name, predicate), ...)   family constraints, predicate(cfg, problem, limits)

Every family also gets the shared constraints below (``SHARED_RULES``): block sizes and num_warps
are powers of two, threads per program within the device maximum, estimated shared memory within
the per-block limit, estimated registers per thread <= 255 and at least one program resident per SM.
``prune`` applies them all before anything is timed and counts what each rule removed.

Adding a family (the matmul templates, attention ...):

    from kiln.autotune.space import Config, Estimate, Space, cdiv, divides, register_space

    def mm_candidates(p):
        for bm, bn, bk, w, s in itertools.product((64, 128), (64, 128, 256), (32, 64), (4, 8), (3, 4)):
            yield Config.make({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)

    def mm_estimate(c, p):
        M, N, K = p.dims["M"], p.dims["N"], p.dims["K"]
        bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
        return Estimate(programs=cdiv(M, bm) * cdiv(N, bn), threads=32 * c.num_warps,
                        smem_bytes=(bm * bk + bk * bn) * c.num_stages * p.itemsize,
                        regs_per_thread=32 + bm * bn // (32 * c.num_warps),
                        bytes_moved=p.itemsize * (M * K * cdiv(N, bn) + K * N * cdiv(M, bm) + M * N),
                        flops=2 * M * N * K, inflight_bytes=(bm + bn) * bk * c.num_stages * p.itemsize)

    register_space(Space("matmul", mm_candidates, mm_estimate,
                         rules=(("BLOCK_K divides K", divides("BLOCK_K", "K")),)))

and the kernel's launcher calls ``kiln.autotune.tuner.tune_launch(source, Problem("matmul",
{"M": M, "N": N, "K": K}, dtype), tensors, run, cache_dir, baseline)``; the tuner prunes, ranks
with the cost model, times the top k and remembers the winner.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class Config:
    """One launch config: named integer parameters (constexprs) plus warps and pipeline stages
    (``num_stages=None``: the compiler's default)."""
    params: tuple = ()                       # sorted (name, value) pairs, hashable
    num_warps: int = 4
    num_stages: int | None = None

    @staticmethod
    def make(params: dict | None = None, num_warps: int = 4, num_stages: int | None = None) -> "Config":
        return Config(tuple(sorted((params or {}).items())), num_warps, num_stages)

    @staticmethod
    def from_dict(d: dict) -> "Config":
        d = dict(d)
        warps, stages = d.pop("num_warps", 4), d.pop("num_stages", None)
        return Config.make(d, warps, stages)

    def __getitem__(self, name: str) -> int:
        return dict(self.params)[name]

    def get(self, name: str, default=None):
        return dict(self.params).get(name, default)

    def as_dict(self) -> dict:
        d = {**dict(self.params), "num_warps": self.num_warps}
        if self.num_stages is not None:
            d["num_stages"] = self.num_stages
        return d


@dataclass(frozen=True)
class Problem:
    """What is being tuned: the family, its sizes, the element type and family facts (bytes a
    loop kernel moves, how many inputs it loads, whether a reduction is one pass ...)."""
    family: str
    dims: dict
    dtype: torch.dtype = torch.float32
    info: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Estimate:
    """Resources and work of one config on one problem: what constraints and the cost model read."""
    programs: int                  # grid size
    threads: int                   # per program
    smem_bytes: int = 0
    regs_per_thread: int = 32
    bytes_moved: float = 0.0       # global-memory traffic
    flops: float = 0.0
    inflight_bytes: float = 0.0    # bytes one program keeps outstanding (latency hiding)


@dataclass(frozen=True)
class DeviceLimits:
    """What a device can hold and how fast it is (defaults: an H100 SXM). ``of`` reads the
    resource limits of a real device; bandwidth and peak only scale the cost model."""
    name: str = "NVIDIA H100 80GB HBM3"
    sm_count: int = 132
    smem_per_block: int = 227 * 1024
    smem_per_sm: int = 228 * 1024
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_threads_per_block: int = 1024
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    l2_bytes: int = 50 * 2**20
    bandwidth: float = 3.0e12      # bytes/s
    peak_flops: float = 6.0e14     # dense 16-bit tensor-core flop/s
    mem_latency_s: float = 7e-7

    @staticmethod
    def of(device=None) -> "DeviceLimits":
        p = torch.cuda.get_device_properties(device)
        d = DeviceLimits()
        return DeviceLimits(
            name=p.name, sm_count=p.multi_processor_count,
            smem_per_block=getattr(p, "shared_memory_per_block_optin", d.smem_per_block),
            smem_per_sm=getattr(p, "shared_memory_per_multiprocessor", d.smem_per_sm),
            regs_per_sm=getattr(p, "regs_per_multiprocessor", d.regs_per_sm),
            max_threads_per_sm=getattr(p, "max_threads_per_multi_processor", d.max_threads_per_sm),
            l2_bytes=getattr(p, "L2_cache_size", d.l2_bytes))

    def blocks_per_sm(self, e: Estimate) -> int:
        """Resident programs per SM (occupancy), limited by threads, registers and shared memory."""
        threads = max(e.threads, 1)
        regs = max(e.regs_per_thread, 1) * threads
        by_smem = self.smem_per_sm // e.smem_bytes if e.smem_bytes else self.max_blocks_per_sm
        return max(0, min(self.max_threads_per_sm // threads, self.regs_per_sm // regs, by_smem,
                          self.max_blocks_per_sm))


Rule = tuple   # (name, predicate(config, problem, limits) -> bool)


@dataclass(frozen=True)
class Space:
    family: str
    candidates: Callable[[Problem], Iterable[Config]]
    estimate: Callable[[Config, Problem], Estimate]
    rules: tuple = ()


def divides(param: str, dim: str) -> Callable:
    """Rule predicate: the block parameter divides the problem dim (no masked tail)."""
    return lambda c, p, lim: p.dims[dim] % c[param] == 0


SHARED_RULES: tuple = (
    ("block sizes and num_warps are powers of two",
     lambda c, p, lim: is_pow2(c.num_warps) and all(is_pow2(v) for k, v in c.params if "BLOCK" in k)),
    ("threads per program <= device max", lambda c, p, lim: 32 * c.num_warps <= lim.max_threads_per_block),
    ("shared memory <= device limit", lambda c, p, lim: SPACES[p.family].estimate(c, p).smem_bytes
     <= lim.smem_per_block),
    ("registers per thread <= 255", lambda c, p, lim: SPACES[p.family].estimate(c, p).regs_per_thread
     <= lim.max_regs_per_thread),
    ("one program fits on an SM", lambda c, p, lim: lim.blocks_per_sm(SPACES[p.family].estimate(c, p)) >= 1),
)

SPACES: dict[str, Space] = {}


def register_space(space: Space) -> None:
    """Add (or replace) the space of ``space.family``."""
    SPACES[space.family] = space


def space_for(family: str) -> Space:
    try:
        return SPACES[family]
    except KeyError:
        raise KeyError(f"no config space for kernel family {family!r}; known: {', '.join(sorted(SPACES))}") from None


def prune(problem: Problem, limits: DeviceLimits) -> tuple[list[Config], dict[str, int]]:
    """The candidates that pass every rule, and how many each rule removed (first failing rule)."""
    space = space_for(problem.family)
    kept, removed = [], {}
    for cfg in dict.fromkeys(space.candidates(problem)):
        failed = next((name for name, ok in SHARED_RULES + tuple(space.rules) if not ok(cfg, problem, limits)), None)
        if failed is None:
            kept.append(cfg)
        else:
            removed[failed] = removed.get(failed, 0) + 1
    return kept, removed


# ---- loop kernels (kiln.fused groups): pointwise and reductions --------------------------------
# info: bytes (moved per launch), live (fp32 values a thread keeps per element), one_pass.

def _loop_estimate(c: Config, p: Problem) -> Estimate:
    x, r = max(p.dims["x"], 1), max(p.dims.get("r", 1), 1)
    xb, rb = c["XBLOCK"], c.get("RBLOCK", 1)
    threads = 32 * c.num_warps
    per_thread = cdiv(xb * rb, threads)
    nbytes = float(p.info.get("bytes", (x * r) * p.itemsize * 2))
    per_elem = nbytes / (x * r)
    one_pass = p.info.get("one_pass", True)
    reduction = p.family == "reduction"
    return Estimate(programs=cdiv(x, xb), threads=threads,
                    smem_bytes=4 * xb * rb if reduction else 0,   # cross-warp reductions stage through smem
                    regs_per_thread=24 + per_thread * int(p.info.get("live", 3)),
                    bytes_moved=nbytes * (1 if one_pass or not reduction else p.info.get("passes", 2)),
                    inflight_bytes=per_elem * xb * (min(rb, r) if reduction else 1))


def _pointwise_candidates(p: Problem):
    for xb in (128, 256, 512, 1024, 2048, 4096, 8192):
        for w in (1, 2, 4, 8, 16):
            yield Config.make({"XBLOCK": xb, "RBLOCK": 1}, w)


def _reduction_candidates(p: Problem):
    r = p.dims["r"]
    if p.info.get("one_pass", True):
        rbs = (next_pow2(r),)
        xbs = (1, 2, 4, 8, 16, 32, 64, 128)
    else:
        rbs = (512, 1024, 2048, 4096, 8192)
        xbs = (1, 2, 4)
    for rb in rbs:
        for xb in xbs:
            for w in (1, 2, 4, 8, 16, 32):
                yield Config.make({"XBLOCK": xb, "RBLOCK": rb}, w)


def _threads_have_work(c, p, lim) -> bool:
    return c["XBLOCK"] * c.get("RBLOCK", 1) >= 32 * c.num_warps


def _xblock_within(c, p, lim) -> bool:
    return c["XBLOCK"] <= max(next_pow2(p.dims["x"]), 128 if p.family == "pointwise" else 1)


def _rblock_fits(c, p, lim) -> bool:
    if p.info.get("one_pass", True):
        return c["RBLOCK"] == next_pow2(p.dims["r"]) and c["XBLOCK"] * c["RBLOCK"] <= 16384
    return c["RBLOCK"] <= next_pow2(p.dims["r"]) and c["XBLOCK"] * c["RBLOCK"] <= 16384


register_space(Space("pointwise", _pointwise_candidates, _loop_estimate,
                     rules=(("every thread has an element", _threads_have_work),
                            ("XBLOCK within the problem", _xblock_within))))
register_space(Space("reduction", _reduction_candidates, _loop_estimate,
                     rules=(("every thread has an element", _threads_have_work),
                            ("XBLOCK within the problem", _xblock_within),
                            ("RBLOCK covers the row (one pass) or tiles it (looped)", _rblock_fits))))

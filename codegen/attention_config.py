"""Launch configs of the attention kernels: the default chosen without timing (per head dim and
dtype, from H100 sweeps) and the spaces the tuner searches (families "attention_fwd" and
"attention_bwd", registered with kiln.autotune.space).

Config keys: BLOCK_M, BLOCK_N (query / key rows per block), num_warps, num_stages; the forward
also reads TMA (1: K and V through tensor descriptors) and WS (1: a warp-specialised key loop),
both 0 unless a config sets them (bench/attention.py --sweep times them)."""
from __future__ import annotations

import itertools

from kiln.autotune.space import Config, Estimate, Problem, Space, cdiv, next_pow2, register_space


def block_d(d: int) -> int:
    return max(16, next_pow2(d))


def default_config(kind: str, sq: int, sk: int, d: int, itemsize: int, interpret: bool) -> dict:
    if interpret:       # the Triton interpreter: few, small blocks keep tests fast
        b = max(16, min(32, next_pow2(max(sq, sk))))
        return {"BLOCK_M": b, "BLOCK_N": b, "num_warps": 4, "num_stages": 1}
    big = block_d(d) > 64 or itemsize == 4
    if kind == "forward":
        if big:
            return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    if big:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def _candidates(p: Problem):
    fwd = p.family == "attention_fwd"
    for bm, bn, w, st in itertools.product((64, 128) if fwd else (32, 64, 128), (32, 64, 128), (4, 8),
                                          (2, 3, 4) if fwd else (1, 2, 3)):
        yield Config.make({"BLOCK_M": bm, "BLOCK_N": bn}, w, st)


def _estimate(c: Config, p: Problem) -> Estimate:
    b, h, sq, sk, d = (p.dims[k] for k in ("B", "H", "SQ", "SK", "D"))
    bm, bn, bd = c["BLOCK_M"], c["BLOCK_N"], block_d(d)
    frac = 0.5 if p.info.get("causal") else 1.0
    flops = 4.0 * b * h * sq * sk * d * frac * (1 if p.family == "attention_fwd" else 2.5)
    tiles = (bm + 2 * bn) * bd * p.itemsize
    return Estimate(programs=cdiv(sq, bm) * b * h, threads=32 * c.num_warps,
                    smem_bytes=tiles * max(c.num_stages or 1, 1) // 2 + bm * bd * p.itemsize,
                    regs_per_thread=32 + (bm * bd + bm * bn) // (32 * c.num_warps),
                    bytes_moved=p.itemsize * b * h * (sq * d * 2 + cdiv(sq, bm) * sk * d * 2 * frac),
                    flops=flops, inflight_bytes=2 * bn * bd * p.itemsize * max(c.num_stages or 1, 1))


for _fam in ("attention_fwd", "attention_bwd"):
    register_space(Space(_fam, _candidates, _estimate,
                         rules=(("BLOCK_M is a multiple of BLOCK_N or the reverse",
                                 lambda c, p, lim: max(c["BLOCK_M"], c["BLOCK_N"]) % min(c["BLOCK_M"], c["BLOCK_N"]) == 0),)))

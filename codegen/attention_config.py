"""Launch configs of the attention kernels: the default chosen without timing (per head dim and
dtype, from H100 sweeps) and the spaces the tuner searches (families "attention_fwd" and
"attention_bwd", registered with kiln.autotune.space).

Config keys: BLOCK_M, BLOCK_N (query / key rows per block), num_warps, num_stages; the forward
also reads TMA (1: K and V through tensor descriptors) and WS (1: a warp-specialised key loop),
both 0 unless a config sets them (bench/attention.py --sweep times them), and ATEN (1: ATen's
flash kernel, 2: cuDNN's; attention_aten.py), which the tuner times where they apply and which
the untuned default takes there (ATEN_DEFAULT)."""
from __future__ import annotations

import itertools

from kiln.autotune.space import Config, Estimate, Problem, Space, cdiv, next_pow2, register_space


def block_d(d: int) -> int:
    return max(16, next_pow2(d))


# An untuned forward (or backward) that ATen's kernels can run runs cuDNN's: on an H200 (B4 H32
# S2048 D128 causal bf16, bench/attention.py) cuDNN's forward 0.27-0.28 ms, kiln's Triton kernel
# 0.36, ATen's flash (FlashAttention-2) 0.49; a training step (forward + backward) eager 1.15 ms,
# kiln's kernels 1.37-1.47. Where cuDNN refuses a problem the launcher runs kiln's kernel.
ATEN_DEFAULT = True
ATEN_CONFIGS = [{"ATEN": kind, "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2} for kind in (2, 1)]


def default_config(kind: str, sq: int, sk: int, d: int, itemsize: int, interpret: bool, aten: bool = False) -> dict:
    """``aten``: ATen's kernels compute this forward (attention_aten.applies)."""
    if aten and ATEN_DEFAULT and not interpret:
        return dict(ATEN_CONFIGS[0])
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
    if p.info.get("aten"):          # the backward: cuDNN's only
        for c in ATEN_CONFIGS if fwd else ATEN_CONFIGS[:1]:
            yield Config.make({k: c[k] for k in ("ATEN", "BLOCK_M", "BLOCK_N")}, c["num_warps"], c["num_stages"])
    for bm, bn, w, st in itertools.product((64, 128) if fwd else (32, 64, 128), (32, 64, 128), (4, 8),
                                          (2, 3, 4) if fwd else (1, 2, 3)):
        yield Config.make({"BLOCK_M": bm, "BLOCK_N": bn}, w, st)


def _estimate(c: Config, p: Problem) -> Estimate:
    b, h, sq, sk, d = (p.dims[k] for k in ("B", "H", "SQ", "SK", "D"))
    bm, bn, bd = c["BLOCK_M"], c["BLOCK_N"], block_d(d)
    frac = 0.5 if p.info.get("causal") else 1.0
    flops = 4.0 * b * h * sq * sk * d * frac * (1 if p.family == "attention_fwd" else 2.5)
    if c.get("ATEN"):       # ATen's kernel as an ideal one: every byte once, at the matmul peak
        return Estimate(programs=max(cdiv(sq, 128) * b * h, 132), threads=256, smem_bytes=0, regs_per_thread=64,
                        bytes_moved=p.itemsize * b * h * (2 * sq + 2 * sk) * d, flops=flops, inflight_bytes=65536)
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

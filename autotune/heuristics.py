"""Launch configurations chosen without timing: the starting point the tuner refines.
Pointwise: 1-D blocks of 1024 elements per program; reductions: one row per program with the
whole row in registers when it fits, several rows per program when rows are short."""
from __future__ import annotations


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def triton_config(kind: str, xnumel: int, rnumel: int, one_pass: bool, interpret: bool) -> dict:
    if kind == "pointwise":
        # 2048 elements over 4 warps: 16 per thread. On an H200 bias+GELU+residual (bf16) ran at
        # 86% of the copy bandwidth with it, 80% with 1024, while libdevice's erf made it
        # compute-bound; with GELU's erfc form (codegen/triton_gen.py) 1024-4096 all run at 95-96%
        xb = min(2048 if not interpret else 256, next_pow2(max(xnumel, 1)))
        return {"XBLOCK": xb, "RBLOCK": 1, "num_warps": 4 if xb >= 512 else 2}
    if one_pass:
        rb = next_pow2(max(rnumel, 1))
        xb = max(1, min(next_pow2(max(xnumel, 1)), (2048 if not interpret else 256) // rb))
        # 16 warps for rows of 8192+: fewer live values per thread (softmax 4096x8192 bf16 on an
        # H200: 80% of the copy roofline against 73% with 8 warps)
        warps = 1 if rb * xb <= 256 else 4 if rb * xb <= 2048 else 8 if rb * xb <= 4096 else 16
        return {"XBLOCK": xb, "RBLOCK": rb, "num_warps": warps}
    return {"XBLOCK": 1, "RBLOCK": 2048 if not interpret else 256, "num_warps": 8}

"""Launch configurations chosen without timing: the starting point the tuner refines.
Pointwise: 1-D blocks of 1024 elements per program; reductions: one row per program with the
whole row in registers when it fits, several rows per program when rows are short."""
from __future__ import annotations


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def triton_config(kind: str, xnumel: int, rnumel: int, one_pass: bool, interpret: bool, itemsize: int = 4,
                  shared_row: bool = False) -> dict:
    """``itemsize``: bytes per element of the widest row the kernel streams (loads and stores);
    ``shared_row``: it also loads a row every row shares (a norm's weight and bias)."""
    if kind == "pointwise":
        # 2048 elements over 4 warps: 16 per thread. On an H200 bias+GELU+residual (bf16) ran at
        # 86% of the copy bandwidth with it, 80% with 1024, while libdevice's erf made it
        # compute-bound; with GELU's erfc form (codegen/triton_gen.py) 1024-4096 all run at 95-96%
        xb = min(2048 if not interpret else 256, next_pow2(max(xnumel, 1)))
        return {"XBLOCK": xb, "RBLOCK": 1, "num_warps": 4 if xb >= 512 else 2}
    if one_pass:
        rb = next_pow2(max(rnumel, 1))
        if interpret:
            return {"XBLOCK": max(1, min(next_pow2(max(xnumel, 1)), 256 // rb)), "RBLOCK": rb, "num_warps": 1}
        # rows of 1024+ one per program, shorter ones packed to 1024 elements; 64 bytes of the row
        # per thread (four 16-byte loads); a row all rows share (weights) read once for two rows
        # of 2 KiB+ (not for 768 of 1024 lanes: 7% slower). On an H200, device time of layer
        # norm, add+RMSNorm and softmax over rows of 128-8192 (bf16, fp32) came within 3% of the
        # best of 1-32 rows x 1-16 warps, where 8-16 elements a thread lost up to 14% (layer
        # norm 16384x4096 bf16: 86% of the copy roofline with one row on 8 warps, 93% on 4, 94%
        # with two rows on 8; 32768x768: 80% -> 92%)
        xb = max(1, min(next_pow2(max(xnumel, 1)), 1024 // rb))
        if shared_row and xb == 1 and 2048 <= rnumel * itemsize and rb <= 8192 and xnumel > 1:
            xb = 2
        warps = max(1, min(16, xb * rb * itemsize // 2048))
        return {"XBLOCK": xb, "RBLOCK": rb, "num_warps": warps}
    # rows past 8192 elements, walked in blocks: 4096 elements over 16 warps. On an H200 against
    # 2048 over 8 (the old default): softmax 4096x32000 bf16 0.263 -> 0.185 ms (8192 over 16:
    # 0.159, but 10-12% slower on the next two), log_softmax 4096x50257 0.652 -> 0.576, layer norm
    # 2048x16384 0.0414 -> 0.0358 (device time; the best of 2048-8192 x 4-16 warps on the last two)
    return {"XBLOCK": 1, "RBLOCK": 4096 if not interpret else 256, "num_warps": 16}

"""Launch configs of the matmul templates: the default chosen without timing, and the space the
tuner searches (family "matmul", registered with kiln.autotune.space). cuBLAS is one candidate
of the space (``ATEN=1``: ATen's matmul, then the template's epilogue pass over its product), so
with tuning on, each shape runs whichever of the two was faster.

Config keys: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K, GEMV (1: the M <= 16 kernel),
ATEN (1: cuBLAS), num_warps, num_stages."""
from __future__ import annotations

import itertools

from kiln.autotune.space import Config, Estimate, Problem, Space, cdiv, next_pow2, register_space
from kiln.passes.matmul import CUBLAS_MIN_FLOPS, CUBLAS_MIN_M

# Measured on an H100 (bench/matmul.py --sweep, device time, bf16): for 1x4096 . 4096->11008 the
# GEMV kernel with DEFER+PREFETCH, BLOCK_N=16, BLOCK_K=512, 4 warps ran 0.0335 ms (90% of the copy
# roofline; cuBLAS 0.0350), the tiled kernel with BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, 4 stages
# 0.0340 ms. On an H200 (81 configs, device time) that GEMV config ran at 83% of the copy roofline
# and the same tile over half the K and threads (BLOCK_K=256, 2 warps: the same 64 elements a
# thread, twice the programs resident per SM) at 87.7%, cuBLAS 86.9%: the default is the latter.
# Large products went to cuBLAS plus the epilogue pass: 2048x2048->8192 with bias+GELU
# 0.114 ms vs 0.121 for the best template; SwiGLU gate/up 8192x4096x2x11008 2.04 vs 2.36 ms. The
# threshold between the measured points is a guess; autotune=True decides per shape.
# TMA_NOTE. On an H200 (bench/probe_tma_gemm.py, device time, bf16, Llama's gate/up 8192x2048 ->
# 2x5632): cuBLAS 0.531 ms for the product and 0.067 for an epilogue pass (silu * mul) after it;
# a persistent Triton kernel reading A and B through TMA descriptors, 128x256x64 tiles, 8 warps,
# 3 stages, 0.523 ms for the plain product (723 TFLOP/s) and 0.492 ms with SwiGLU in its epilogue
# (it writes half the bytes); Inductor's whole SwiGLU 0.549. kiln's two products (gate and up
# read through two descriptors, two dots a K step: no weights interleaved, no copy of them) ran
# 0.539 ms at best (128x128x64, 8 warps, 4 stages, the tile loop not flattened; 0.665 flattened
# with 3 stages) against cuBLAS's two products 0.495 plus the epilogue pass 0.067 (bench/probe_dual_dot.py).
# The Llama layer's down projection with its residual add: 0.239 ms (cuBLAS 0.235 plus a 0.023
# pass). So a large product whose epilogue cuBLAS cannot fuse runs as that kernel; a plain
# product or one plus a bias stays on cuBLAS. Gate and up read through one [2, N, K] view of
# both weights (their distance as its outer stride: one load and one dot of twice the width)
# ran 0.533 against 0.577 for two descriptors (bench/probe_pair_view.py), and with that view the
# flattened tile loop wins at K = 2048 (bench/probe_pair_rows.py, all in one process, against
# cuBLAS's two products: 1.050x with 3 stages flattened, 1.087x not flattened, 1.065-1.083x with
# 4 stages), and loses at K = 4096 (the SwiGLU MLP's 8192x4096 -> 11008, kiln's kernel by
# bench/gpu_kernel_profile.py against Inductor's two cuBLAS products, three runs alternating:
# 1.047x and 1.031x flattened, 1.012x not; Llama's gate/up in the same runs 0.514 and 0.510 ms
# flattened, 0.524 not). A [N, 2, K] view (accumulator columns interleaved, a register-local
# split) and weights interleaved by a copy ran no faster. Outputs stored through TMA descriptors
# (codegen/matmul.py _tma_stores) and GROUP_M 16 (bench/probe_pair_rows.py, the variants in one
# process, against cuBLAS's two products): at K = 2048 1.065x (flattened; 1.110x with pointer
# stores and GROUP_M 8), at K = 4096 0.993-0.995x flattened (1.013x before); GROUP_M 16 beat 8
# in 7 of 8 pairs, by ~1%.
# PAIR_NOTE. Two plain products of one weight shape (GQA's k and v, passes/matmul._plain_units)
# at Llama's 8192x2048 -> 256 each (bench/probe_kv_pair.py, H200, round robin): cuBLAS's two
# products 0.0288 ms, the TMA kernel over the pair view 0.0253 (128x128x64, 8 warps, 3 stages,
# flattened; 4 stages not flattened 0.0255), one cuBLAS product over the weights concatenated
# 0.0250. At Llama-3-8B's 8192x4096 -> 1024 each the same kernel took 1.005x cuBLAS's: a pair
# whose products are large enough alone stays on cuBLAS.
GEMV_KERNEL_MAX_M = 4        # above this the tiled kernel with BLOCK_M=16 streams B as well


def _tf32() -> bool:
    import torch
    return bool(torch.backends.cuda.matmul.allow_tf32)


def problem_dims(meta: dict) -> dict:
    segs = meta["segments"]
    return {"M": meta["M"], "K": meta["K"], "B": meta["batch"], "N": sum(s["n"] for s in segs),
            "P": max(s["P"] for s in segs), "cols": sum(s["n"] * s["P"] for s in segs),
            "nmax": max(s["n"] for s in segs)}


def split_k(tiles: int, K: int, bk: int, sms: int) -> int:
    """Split K when the tiles cannot fill half the GPU and each slice keeps >= 4 K blocks."""
    if tiles >= sms // 2:
        return 1
    s = 1
    while s < 16 and tiles * s * 2 <= sms and K // (s * 2) >= 4 * bk:
        s *= 2
    return s


def default_config(meta: dict, interpret: bool, sms: int = 132, tma: bool = False) -> dict:
    """The launch config without timing. ``tma``: the device has TMA (Hopper and later) and the
    kernel has its TMA variant (one segment, operands TMA can read)."""
    d = problem_dims(meta)
    M, K, bt, P = d["M"], d["K"], d["B"], d["P"]
    base = {"GROUP_M": 8, "SPLIT_K": 1, "GEMV": 0, "ATEN": 0}
    if interpret:       # the Triton interpreter: small tiles keep tests fast
        bm = max(1, next_pow2(M)) if meta["gemv"] else 16
        return {**base, "BLOCK_M": min(bm, 16), "BLOCK_N": 32, "BLOCK_K": 32, "GEMV": int(meta["gemv"]),
                "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
    itemsize = 4 if meta["dtype"] == "float32" else 2
    if meta["gemv"] and M <= GEMV_KERNEL_MAX_M:
        bm = next_pow2(M)
        return {**base, "GEMV": 1, "BLOCK_M": bm, "BLOCK_N": max(4, 16 // P), "BLOCK_K": max(16, 256 // bm),
                "GROUP_M": 1, "DEFER": 1, "PREFETCH": 1, "num_warps": 2, "num_stages": 1}
    flops = 2 * bt * M * K * d["cols"]
    if itemsize == 4 and not meta["prologue"] and not meta["gemv"] and not _tf32():
        # fp32 without TF32: Triton's IEEE dot runs as FMA loops, no tensor cores, where cuBLAS's
        # SGEMM is tuned for exactly that. (The fp32 demo model, whose eight matmuls ran as
        # templates, replayed in 1.43 ms on an H200 against eager's 1.15 ms; this is the suspect,
        # not yet measured on its own.)
        return {**base, "ATEN": 1, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4}
    lay = meta.get("tma") or {}
    if meta.get("identity") and P == 2 and M >= CUBLAS_MIN_M and not meta["prologue"]:
        # two plain products (passes/matmul._plain_units): one launch over both where the device
        # has TMA and they are too small to fill it alone (PAIR_NOTE); else cuBLAS's two products
        if tma and itemsize == 2 and lay.get("pair") and flops < 2 * CUBLAS_MIN_FLOPS:
            return {**base, "TMA": 1, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8,
                    "num_stages": 3, "FLATTEN": 1}
        return {**base, "ATEN": 1, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4}
    if M >= CUBLAS_MIN_M and flops >= CUBLAS_MIN_FLOPS and not meta["prologue"]:
        if tma and itemsize == 2 and not meta["identity"]:
            # an epilogue cuBLAS cannot run: the persistent TMA kernel fuses it (see TMA_NOTE)
            if P == 1:
                return {**base, "TMA": 1, "BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "FLATTEN": 1,
                        "num_warps": 8, "num_stages": 3}
            if P == 2 and lay.get("pair"):
                return {**base, "TMA": 1, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8,
                        "num_stages": 3, "FLATTEN": int(K <= 2048 or bool(lay.get("stores"))), "GROUP_M": 16}
            return {**base, "TMA": 1, "BLOCK_M": 128, "BLOCK_N": 128 if P == 2 else 64, "BLOCK_K": 64,
                    "FLATTEN": 0, "num_warps": 8, "num_stages": 4}
        return {**base, "ATEN": 1, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4}
    if M <= 16:
        bm, bn, bk, w, st = 16, 128 // P, 128 if itemsize == 2 else 64, 4, 4
    elif M <= 64:
        bm, bn, bk, w, st = 64, 128, 64, 4, 4
    else:
        bm, bn, bk, w, st = 128, 128 if P > 1 else 256, 64, 8, 3
    if itemsize == 4:
        bk = min(bk, 32)
    tiles = cdiv(M, bm) * sum(cdiv(s["n"], bn) for s in meta["segments"]) * bt
    return {**base, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k(tiles, K, bk, sms),
            "num_warps": w, "num_stages": st}


# ---- the tuner's space ---------------------------------------------------------------------

def _candidates(p: Problem):
    M, K = p.dims["M"], p.dims["K"]
    if p.info.get("aten", True):
        yield Config.make({"ATEN": 1, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8,
                           "SPLIT_K": 1, "GEMV": 0}, 4)
    if p.info.get("tma"):
        for bm, bn, bk, w, st, fl in itertools.product((128, 256), (64, 128, 256), (64, 128), (4, 8), (2, 3, 4),
                                                       (0, 1)):
            yield Config.make({"TMA": 1, "GEMV": 0, "ATEN": 0, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                               "GROUP_M": 8, "SPLIT_K": 1, "FLATTEN": fl}, w, st)
    if p.info.get("gemv") and M <= 16:
        bm = next_pow2(M)
        for bn, bk, w, st, sk, df, pf in itertools.product((4, 8, 16, 32, 64), (64, 128, 256, 512, 1024), (2, 4, 8),
                                                           (1, 3), (1, 2, 4), (0, 1), (0, 1)):
            yield Config.make({"GEMV": 1, "ATEN": 0, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1,
                               "SPLIT_K": sk, "DEFER": df, "PREFETCH": pf}, w, st)
    bms = (16, 32, 64) if M <= 64 else (64, 128, 256)
    for bm, bn, bk, gm, w, st, sk in itertools.product(bms, (32, 64, 128, 256), (32, 64, 128), (8,), (4, 8),
                                                       (2, 3, 4, 5), (1, 2, 4, 8, 16)):
        if sk > 1 and K // sk < 2 * bk:
            continue
        yield Config.make({"GEMV": 0, "ATEN": 0, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm,
                           "SPLIT_K": sk}, w, st)


def _estimate(c: Config, p: Problem) -> Estimate:
    M, K, N, bt, P, cols = (p.dims[k] for k in ("M", "K", "N", "B", "P", "cols"))
    isz = p.itemsize
    bm, bn, bk, sk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["SPLIT_K"]
    threads = 32 * c.num_warps
    stages = c.num_stages or 3
    out_bytes = isz * bt * M * N
    partial = 4 * bt * M * cols * sk * 2 if sk > 1 else 0
    if c["ATEN"]:           # cuBLAS as an ideal kernel, plus the epilogue pass over its product
        extra = 0 if p.info.get("identity") else 2 * isz * bt * M * cols
        return Estimate(programs=max(cdiv(M, 128) * cdiv(cols, 128) * bt, 132), threads=256, smem_bytes=0,
                        regs_per_thread=64, bytes_moved=isz * bt * (M * K + K * cols) + out_bytes + extra,
                        flops=2.0 * bt * M * cols * K, inflight_bytes=65536)
    if c["GEMV"]:
        programs = cdiv(N, bn) * bt * sk
        tile = bn * bk * P * (2 if c.get("PREFETCH") else 1)
        return Estimate(programs=programs, threads=threads, smem_bytes=0,
                        regs_per_thread=32 + (bm * bn * bk * P * (2 if c.get("DEFER") else 1) + tile + bm * bk) // threads,
                        bytes_moved=isz * bt * (K * cols + M * K * cdiv(N, bn)) + out_bytes + partial,
                        flops=2.0 * bt * M * cols * K, inflight_bytes=isz * tile)
    tiles = cdiv(M, bm) * cdiv(N, bn) * bt
    return Estimate(programs=tiles * sk, threads=threads, smem_bytes=stages * (bm * bk + P * bk * bn) * isz,
                    regs_per_thread=32 + (P * bm * bn) // threads,
                    bytes_moved=isz * bt * (M * K * cdiv(N, bn) + K * cols * cdiv(M, bm)) + out_bytes + partial,
                    flops=2.0 * bt * M * cols * K, inflight_bytes=(bm + P * bn) * bk * stages * isz)


def _gemv_fits(c, p, lim) -> bool:
    return not c["GEMV"] or (p.dims["M"] <= 16 and c["BLOCK_M"] >= p.dims["M"])


def _aten_allowed(c, p, lim) -> bool:
    return not c["ATEN"] or p.info.get("aten", True)


def _block_m_within(c, p, lim) -> bool:
    return c["ATEN"] or c["GEMV"] or c["BLOCK_M"] <= max(16, next_pow2(p.dims["M"]))


register_space(Space("matmul", _candidates, _estimate,
                     rules=(("GEMV kernel only for M <= 16", _gemv_fits), ("cuBLAS needs A in memory", _aten_allowed),
                            ("BLOCK_M within the problem", _block_m_within))))

"""kiln's persistent TMA kernel for one product with a residual add in its epilogue (Llama's o and
down projections, out = x + a @ w.T), in launch configs side by side, against cuBLAS's product
alone, followed by the add, and adding the residual itself in place (addmm, beta = 1). kiln's
default (128x256x64 tiles, 8 warps, 3 stages, flattened) ran Llama's o projection with its
residual in 0.103 ms where cuBLAS's product took 0.088.
Timed round robin in one process.

    python bench/probe_single_tma.py     (an sm90+ GPU)
"""
import os, sys
import torch, triton, triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_dual_dot import _tile, report, round_robin, trial  # noqa: E402  (the probes' tile order, trial, timing)


@triton.jit
def single(a_desc, b_desc, res, out, o_desc, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
           GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, STORE: tl.constexpr):
    """STORE 0: masked pointer stores; 1: through a TMA descriptor (o_desc)."""
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    npg = GROUP_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile(tile, npg, num_pid_m, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            acc = tl.dot(a_desc.load([pid_m * BM, k0]), b_desc.load([pid_n * BN, k0]).T, acc)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        r = tl.load(res + rm[:, None] * N + rn[None, :], mask=mask, other=0).to(tl.float32)
        o = (acc.to(tl.bfloat16).to(tl.float32) + r).to(tl.bfloat16)
        if STORE == 1:
            o_desc.store([pid_m * BM, pid_n * BN], o)
        else:
            tl.store(out + rm[:, None] * N + rn[None, :], o, mask=mask)


CONFIGS = [  # BM, BN, BK, warps, stages, GROUP_M, flatten, store
    (128, 256, 64, 8, 3, 8, True, 0), (128, 256, 64, 8, 3, 8, False, 0), (128, 256, 64, 8, 4, 8, True, 0),
    (128, 256, 64, 8, 3, 16, True, 0), (128, 256, 64, 8, 2, 8, True, 1), (256, 128, 64, 8, 3, 8, True, 0),
    (128, 128, 64, 8, 4, 8, True, 0), (128, 128, 64, 8, 4, 8, True, 1), (128, 128, 64, 4, 4, 8, True, 1),
    (128, 128, 64, 8, 5, 8, True, 1), (128, 128, 128, 8, 3, 8, True, 1), (128, 128, 64, 8, 4, 16, False, 1),
]


def main(M, K, N):
    torch.manual_seed(0)
    dt = torch.bfloat16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    a = torch.randn(M, K, device="cuda", dtype=dt)
    w = torch.randn(N, K, device="cuda", dtype=dt) / K ** 0.5
    x = torch.randn(M, N, device="cuda", dtype=dt)
    ref = (a.float() @ w.float().T) + x.float()
    out = torch.empty(M, N, device="cuda", dtype=dt)
    prod = torch.empty(M, N, device="cuda", dtype=dt)
    runs = {"cublas_mm": ({}, lambda: torch.mm(a, w.T, out=prod)),
            "cublas_mm_add": ({}, lambda: torch.add(torch.mm(a, w.T, out=prod), x, out=out)),
            # cuBLAS's own epilogue, C = A @ B + C, over the residual in place (where it is dead after)
            "cublas_addmm_in_place": ({}, lambda: torch.addmm(prod, a, w.T, out=prod))}
    for BM, BN, BK, wp, st, gm, fl, store in CONFIGS:
        cfg = dict(BM=BM, BN=BN, BK=BK, warps=wp, stages=st, group_m=gm, flatten=fl, store=["pointer", "tma"][store])
        g = (min(sms, triton.cdiv(M, BM) * triton.cdiv(N, BN)),)
        a_d = TensorDescriptor.from_tensor(a, [BM, BK])
        b_d = TensorDescriptor.from_tensor(w, [BN, BK])
        o_d = TensorDescriptor.from_tensor(out, [BM, BN])
        f = (lambda g=g, a_d=a_d, b_d=b_d, o_d=o_d, BM=BM, BN=BN, BK=BK, wp=wp, st=st, gm=gm, fl=fl, store=store:
             single[g](a_d, b_d, x, out, o_d, M, N, K, BM=BM, BN=BN, BK=BK, GROUP_M=gm, NUM_SMS=g[0], FLATTEN=fl,
                       STORE=store, num_warps=wp, num_stages=st))
        trial(runs, cfg, f, out, ref)
    times = round_robin(runs, reps=40)
    report(runs, times, {"M": M, "K": K, "N": N}, "cublas_mm", "of_cublas_mm")


if __name__ == "__main__":
    main(8192, 2048, 2048)      # Llama's o projection
    main(8192, 5632, 2048)      # its down projection

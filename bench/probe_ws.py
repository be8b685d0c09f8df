"""Triton's warp specialization on Hopper for kiln's SwiGLU pair kernel (gate and up through one
[2, N, K] view, silu(gate) * up in the epilogue, the output stored through a TMA descriptor):
``warp_specialize=True`` on the persistent tile loop or on a non-persistent kernel's K loop,
with descriptors made on the device (as Triton's Hopper examples do), against the kernel kiln
runs (host descriptors, one warp group set, flattened persistent loop) and cuBLAS's two
products. Timed round robin in one process at Llama's (8192x2048 -> 5632) and the SwiGLU
MLP's (8192x4096 -> 11008) shapes.

    python bench/probe_ws.py      (an sm90+ GPU)
"""
import os, sys
import torch, triton, triton.language as tl
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_dual_dot import _tile, report, round_robin, trial  # noqa: E402  (the probes' tile order, trial, timing)
from probe_pair_rows import swiglu, view  # noqa: E402  (kiln's kernel, as probed before)


@triton.jit
def _finish(acc, out_desc, pid_m, pid_n, BM: tl.constexpr, BH: tl.constexpr, SWAP: tl.constexpr):
    lo, hi = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BH)), (0, 2, 1)))
    if SWAP:
        g, u = hi, lo
    else:
        g, u = lo, hi
    g = g.to(tl.bfloat16).to(tl.float32)
    u = u.to(tl.bfloat16).to(tl.float32)
    o = (g / (1.0 + tl.exp(-g))).to(tl.bfloat16).to(tl.float32) * u
    out_desc.store([pid_m * BM, pid_n * BH], o.to(tl.bfloat16))


@triton.jit
def swiglu_dev(x, w, out, M, N, K, D, BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
               GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, SWAP: tl.constexpr, PERSISTENT: tl.constexpr,
               WS: tl.constexpr, FLATTEN: tl.constexpr):
    """Descriptors made on the device; ``w`` is the weight at the lower address, D the distance
    to the other in elements."""
    a_desc = tl.make_tensor_descriptor(x, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    w_desc = tl.make_tensor_descriptor(w, shape=[2, N, K], strides=[D, K, 1], block_shape=[2, BH, BK])
    o_desc = tl.make_tensor_descriptor(out, shape=[M, N], strides=[N, 1], block_shape=[BM, BH])
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BH)
    npg = GROUP_M * num_pid_n
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN,
                             warp_specialize=WS):
            pid_m, pid_n = _tile(tile, npg, num_pid_m, GROUP_M)
            acc = tl.zeros((BM, 2 * BH), dtype=tl.float32)
            for k0 in range(0, K, BK):
                a = a_desc.load([pid_m * BM, k0])
                b = tl.reshape(w_desc.load([0, pid_n * BH, k0]), (2 * BH, BK))
                acc = tl.dot(a, b.T, acc)
            _finish(acc, o_desc, pid_m, pid_n, BM, BH, SWAP)
    else:
        pid_m, pid_n = _tile(tl.program_id(0), npg, num_pid_m, GROUP_M)
        acc = tl.zeros((BM, 2 * BH), dtype=tl.float32)
        for k0 in tl.range(0, K, BK, warp_specialize=WS):
            a = a_desc.load([pid_m * BM, k0])
            b = tl.reshape(w_desc.load([0, pid_n * BH, k0]), (2 * BH, BK))
            acc = tl.dot(a, b.T, acc)
        _finish(acc, o_desc, pid_m, pid_n, BM, BH, SWAP)


def main(M, K, N):
    from triton.tools.tensor_descriptor import TensorDescriptor
    triton.set_allocator(lambda size, align, stream: torch.empty(size, device="cuda", dtype=torch.int8))
    torch.manual_seed(0)
    dt = torch.bfloat16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.randn(M, K, device="cuda", dtype=dt)
    wg = torch.randn(N, K, device="cuda", dtype=dt) / K ** 0.5
    junk = torch.empty(1000, device="cuda", dtype=dt)              # noqa: F841 (the weights are not adjacent)
    wu = torch.randn(N, K, device="cuda", dtype=dt) / K ** 0.5
    ref = F.silu(F.linear(x.float(), wg.float())) * F.linear(x.float(), wu.float())
    out = torch.empty(M, N, device="cuda", dtype=dt)
    lo, hi, swap = (wg, wu, False) if wg.data_ptr() < wu.data_ptr() else (wu, wg, True)
    dist = (hi.data_ptr() - lo.data_ptr()) // lo.element_size()
    runs = {"cublas_two_mm": ({}, lambda: (F.linear(x, wg), F.linear(x, wu)))}
    # kiln's kernel as it runs now (host descriptors, flattened persistent loop, GROUP_M 16)
    a_d = TensorDescriptor.from_tensor(x, [128, 64])
    w_d, sw = view(wg, wu, 0, 128, 64)
    o_d = TensorDescriptor.from_tensor(out, [128, 128])
    g0 = (min(sms, triton.cdiv(M, 128) * triton.cdiv(N, 128)),)
    runs["kiln_host"] = ({"case": "kiln_host"}, lambda: swiglu[g0](
        a_d, w_d, out, o_d, M, N, K, BM=128, BH=128, BK=64, GROUP_M=16, NUM_SMS=g0[0], FLATTEN=K <= 2048,
        LAYOUT=0, SWAP=sw, STORE=1, num_warps=8, num_stages=3))
    for persistent, ws, w, st, gm, bh in [(p, ws, w, st, gm, bh) for p in (1, 0) for ws in (0, 1) for w in (4, 8)
                                          for st in (3, 4) for gm in (16,) for bh in (128,)]:
        if w == 4 and not ws:
            continue
        flatten = bool(persistent and not ws)
        cfg = dict(persistent=persistent, ws=ws, warps=w, stages=st, group_m=gm, BH=bh, flatten=flatten)
        nt = triton.cdiv(M, 128) * triton.cdiv(N, bh)
        g = (min(sms, nt),) if persistent else (nt,)
        f = (lambda g=g, w=w, st=st, gm=gm, ws=ws, persistent=persistent, flatten=flatten, bh=bh: swiglu_dev[g](
            x, lo, out, M, N, K, dist, BM=128, BH=bh, BK=64, GROUP_M=gm, NUM_SMS=g[0], SWAP=swap,
            PERSISTENT=persistent, WS=ws, FLATTEN=flatten, num_warps=w, num_stages=st))
        trial(runs, cfg, f, out, ref, width=200)
    out.zero_()
    runs["kiln_host"][1]()
    runs["kiln_host"][0]["err"] = round(((out.float() - ref).norm() / ref.norm()).item(), 5)
    times = round_robin(runs, reps=40)
    report(runs, times, {"M": M, "K": K, "N": N}, "cublas_two_mm", "of_cublas")


if __name__ == "__main__":
    main(8192, 2048, 5632)
    main(8192, 4096, 11008)

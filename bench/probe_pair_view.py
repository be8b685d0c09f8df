"""Gate and up weights, two allocations, read as one [2, N, K] TMA view (base the lower address,
the distance between them as the outer stride): one load of both tiles, one dot, no copy of the
weights. Against the two-descriptor kernel (two dots a K step).

    python bench/probe_pair_view.py    (an sm90+ GPU; TRITON_INTERPRET=1 on a CPU: fp16, small)
"""
import json, os, sys
import torch, triton, triton.language as tl
import torch.nn.functional as F
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_dual_dot import _tile, bench  # noqa: E402  (the probes' tile order and timing loop)


@triton.jit
def pair3d(a_desc, w_desc, out, M, N, K, BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
           GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, SWAP: tl.constexpr):
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BH)
    npg = GROUP_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile(tile, npg, num_pid_m, GROUP_M)
        acc = tl.zeros((BM, 2 * BH), dtype=tl.float32)
        for k0 in range(0, K, BK):
            a = a_desc.load([pid_m * BM, k0])
            b = w_desc.load([0, pid_n * BH, k0])            # [2, BH, BK]
            b = tl.reshape(b, (2 * BH, BK))
            acc = tl.dot(a, b.T, acc)
        acc3 = tl.permute(tl.reshape(acc, (BM, 2, BH)), (0, 2, 1))
        lo, hi = tl.split(acc3)
        if SWAP:
            g, u = hi, lo
        else:
            g, u = lo, hi
        g = g.to(out.dtype.element_ty).to(tl.float32)
        u = u.to(out.dtype.element_ty).to(tl.float32)
        o = (g / (1.0 + tl.exp(-g))).to(out.dtype.element_ty).to(tl.float32) * u
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BH + tl.arange(0, BH)
        tl.store(out + rm[:, None] * N + rn[None, :], o.to(out.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def pair_view(wg, wu, bh, bk):
    lo, hi, swap = (wg, wu, False) if wg.data_ptr() < wu.data_ptr() else (wu, wg, True)
    d = (hi.data_ptr() - lo.data_ptr()) // lo.element_size()
    assert (hi.data_ptr() - lo.data_ptr()) % 16 == 0
    n, k = lo.shape
    return TensorDescriptor(lo, [2, n, k], [d, k, 1], [2, bh, bk]), swap




def main(M, K, N, dev, dt):
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 3
    x = torch.randn(M, K, device=dev, dtype=dt)
    wg = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
    junk = torch.empty(1000, device=dev, dtype=dt)              # the two weights are not adjacent
    wu = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
    ref = F.silu(F.linear(x.float(), wg.float())) * F.linear(x.float(), wu.float())
    out = torch.empty(M, N, device=dev, dtype=dt)
    cfgs = [(128, 128, 64, 8, 3, True), (128, 128, 64, 8, 4, False), (128, 128, 64, 8, 3, False),
            (128, 64, 64, 8, 4, True)] if dev == "cuda" else [(32, 16, 16, 4, 2, True)]
    wg0, wu0 = wg, wu
    for order in ("sep", "gu", "ug"):
        if order == "sep":          # two allocations, something between them
            wg, wu = wg0, wu0
        else:
            buf = torch.empty(2 * N * K + 64, device=dev, dtype=dt)     # 128 bytes apart
            lo_w, hi_w = buf[:N * K].view(N, K), buf[N * K + 64:].view(N, K)
            if order == "ug":       # up below gate in memory: the view's halves swap
                wu, wg = lo_w.copy_(wu0), hi_w.copy_(wg0)
            else:
                wg, wu = lo_w.copy_(wg0), hi_w.copy_(wu0)
        if dev == "cuda" and order != "sep":
            cfgs = cfgs[:1]
        for BM, BH, BK, w, st, fl in cfgs:
            cfg = dict(order=order, BM=BM, BH=BH, BK=BK, warps=w, stages=st, flatten=fl)
            try:
                a_d = TensorDescriptor.from_tensor(x, [BM, BK])
                w_d, swap = pair_view(wg, wu, BH, BK)
                tiles = triton.cdiv(M, BM) * triton.cdiv(N, BH)
                g = (min(sms, tiles),)
                f = lambda: pair3d[g](a_d, w_d, out, M, N, K, BM=BM, BH=BH, BK=BK, GROUP_M=8, NUM_SMS=g[0],
                                      FLATTEN=fl, SWAP=swap, num_warps=w, num_stages=st)
                f()
                cfg["err"] = ((out.float() - ref).norm() / ref.norm()).item()
                if dev == "cuda":
                    cfg["ms"] = bench(f)
            except Exception as e:
                cfg["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            print(json.dumps(cfg), flush=True)


def reference(M=8192, K=2048, N=5632):
    """The two-descriptor kernel's best config and cuBLAS, same process."""
    from probe_dual_dot import dual
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    wg, wu = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for _ in range(2))
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    a_d, g_d, u_d = (TensorDescriptor.from_tensor(t, [128, 64]) for t in (x, wg, wu))
    grid = (torch.cuda.get_device_properties(0).multi_processor_count,)
    f = lambda: dual[grid](a_d, g_d, u_d, out, M, N, K, BM=128, BN=128, BK=64, GROUP_M=8, NUM_SMS=grid[0],
                           VARIANT=0, FLATTEN=False, num_warps=8, num_stages=4)
    print(json.dumps({"two_descriptors_ms": bench(f), "cublas_two_mm_ms": bench(lambda: (F.linear(x, wg), F.linear(x, wu)))}), flush=True)


if __name__ == "__main__":
    if torch.cuda.is_available():
        reference()
        main(8192, 2048, 5632, "cuda", torch.bfloat16)
    else:
        main(64, 64, 64, "cpu", torch.float16)

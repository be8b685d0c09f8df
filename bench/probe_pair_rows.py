"""Gate and up read through one TMA view with the pair as the *middle* dimension ([N, 2, K],
strides [row, distance, 1]): a [BH, 2, BK] block flattens to rows g0, u0, g1, u1, ..., so the
accumulator's columns interleave and the SwiGLU split is ``reshape(BM, BH, 2)`` (neighbouring
columns, which one thread holds) instead of the [2, N, K] view's permute of two half-tiles.
Against the [2, N, K] view and weights interleaved by a copy (one 2-D descriptor), each with the
tile loop flattened or not, the output stored by masked pointer stores or through a TMA
descriptor, GROUP_M 8 or 16; cuBLAS's two products for reference. Timed round robin in one
process, at Llama's (8192x2048 -> 5632) and the SwiGLU MLP's (8192x4096 -> 11008) shapes.

    python bench/probe_pair_rows.py [--layouts 2NK N2K copy]
    (an sm90+ GPU; TRITON_INTERPRET=1 on a CPU: fp16, small)
"""
import argparse, json, os, sys
import torch, triton, triton.language as tl
import torch.nn.functional as F
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_dual_dot import _tile, round_robin  # noqa: E402  (the probes' tile order and timing)


@triton.jit
def swiglu(a_desc, w_desc, out, out_desc, M, N, K, BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
           GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, LAYOUT: tl.constexpr,
           SWAP: tl.constexpr, STORE: tl.constexpr):
    """LAYOUT 0: [2, N, K] view; 1: [N, 2, K] view; 2: 2-D [2N, K] weights interleaved in rows.
    STORE 0: masked pointer stores; 1: the output through a TMA descriptor (out_desc)."""
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BH)
    npg = GROUP_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile(tile, npg, num_pid_m, GROUP_M)
        acc = tl.zeros((BM, 2 * BH), dtype=tl.float32)
        for k0 in range(0, K, BK):
            a = a_desc.load([pid_m * BM, k0])
            if LAYOUT == 0:
                b = tl.reshape(w_desc.load([0, pid_n * BH, k0]), (2 * BH, BK))
            elif LAYOUT == 1:
                b = tl.reshape(w_desc.load([pid_n * BH, 0, k0]), (2 * BH, BK))
            else:
                b = w_desc.load([2 * pid_n * BH, k0])
            acc = tl.dot(a, b.T, acc)
        if LAYOUT == 0:
            lo, hi = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BH)), (0, 2, 1)))
        else:
            lo, hi = tl.split(tl.reshape(acc, (BM, BH, 2)))
        if SWAP:
            g, u = hi, lo
        else:
            g, u = lo, hi
        g = g.to(out.dtype.element_ty).to(tl.float32)
        u = u.to(out.dtype.element_ty).to(tl.float32)
        o = (g / (1.0 + tl.exp(-g))).to(out.dtype.element_ty).to(tl.float32) * u
        if STORE == 1:
            out_desc.store([pid_m * BM, pid_n * BH], o.to(out.dtype.element_ty))
        else:
            rm = pid_m * BM + tl.arange(0, BM)
            rn = pid_n * BH + tl.arange(0, BH)
            tl.store(out + rm[:, None] * N + rn[None, :], o.to(out.dtype.element_ty),
                     mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def pair_products(a_desc, w_desc, pid_m, pid_n, K, BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                  SWAP: tl.constexpr):
    """One [BM, BH] tile of both products through the [2, N, K] view (``view``'s layout 0): one
    load and one dot of twice the width a K step. Returns (first weight's, second's)."""
    acc = tl.zeros((BM, 2 * BH), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = a_desc.load([pid_m * BM, k0])
        b = tl.reshape(w_desc.load([0, pid_n * BH, k0]), (2 * BH, BK))
        acc = tl.dot(a, b.T, acc)
    lo, hi = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BH)), (0, 2, 1)))
    if SWAP:
        first, second = hi, lo
    else:
        first, second = lo, hi
    return first, second


def view(wg, wu, layout, bh, bk):
    """(descriptor, swap) over the two weights as they lie in memory (layout 2: an interleaved copy)."""
    n, k = wg.shape
    if layout == 2:
        wi = torch.stack([wg, wu], 1).reshape(2 * n, k).contiguous()
        return TensorDescriptor(wi, [2 * n, k], [k, 1], [2 * bh, bk]), False
    lo, hi, swap = (wg, wu, False) if wg.data_ptr() < wu.data_ptr() else (wu, wg, True)
    d = (hi.data_ptr() - lo.data_ptr()) // lo.element_size()
    if layout == 0:
        return TensorDescriptor(lo, [2, n, k], [d, k, 1], [2, bh, bk]), swap
    return TensorDescriptor(lo, [n, 2, k], [k, d, 1], [bh, 2, bk]), swap


LAYOUTS = ["2NK", "N2K", "copy"]


def main(M, K, N, dev, dt, layouts=("2NK",)):
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 3
    x = torch.randn(M, K, device=dev, dtype=dt)
    wg = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
    junk = torch.empty(1000, device=dev, dtype=dt)              # noqa: F841 (the weights are not adjacent)
    wu = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
    ref = F.silu(F.linear(x.float(), wg.float())) * F.linear(x.float(), wu.float())
    out = torch.empty(M, N, device=dev, dtype=dt)
    runs = {}       # name -> (config, launch)
    if dev == "cuda":
        runs["cublas_two_mm"] = ({}, lambda: (F.linear(x, wg), F.linear(x, wu)))
        cfgs = [(128, 128, 64, 8, 3, fl, st, gm) for fl in (False, True) for st in (0, 1) for gm in (8, 16)]
    else:
        cfgs = [(32, 16, 16, 4, 2, False, st, 4) for st in (0, 1)]
    for layout in [LAYOUTS.index(name) for name in layouts]:
        for swapped in (False, True):
            if swapped and (layout == 2 or dev == "cuda"):
                continue
            for BM, BH, BK, w, st, fl, store, gm in cfgs:
                cfg = dict(layout=LAYOUTS[layout], swapped=swapped, BM=BM, BH=BH, BK=BK, warps=w,
                           stages=st, flatten=fl, store=["pointer", "tma"][store], group_m=gm)
                try:
                    a_d = TensorDescriptor.from_tensor(x, [BM, BK])
                    if swapped:     # same values, up at the lower address
                        lo, hi = sorted((torch.empty_like(wg), torch.empty_like(wu)), key=lambda t: t.data_ptr())
                        w_d, swap = view(hi.copy_(wg), lo.copy_(wu), layout, BH, BK)
                    else:
                        w_d, swap = view(wg, wu, layout, BH, BK)
                    g = (min(sms, triton.cdiv(M, BM) * triton.cdiv(N, BH)),)
                    o_d = TensorDescriptor.from_tensor(out, [BM, BH])
                    f = (lambda a_d=a_d, w_d=w_d, o_d=o_d, g=g, BM=BM, BH=BH, BK=BK, fl=fl, layout=layout,
                         swap=swap, w=w, st=st, store=store, gm=gm:
                         swiglu[g](a_d, w_d, out, o_d, M, N, K, BM=BM, BH=BH, BK=BK, GROUP_M=gm, NUM_SMS=g[0],
                                   FLATTEN=fl, LAYOUT=layout, SWAP=swap, STORE=store, num_warps=w, num_stages=st))
                    out.zero_()
                    f()
                    cfg["err"] = round(((out.float() - ref).norm() / ref.norm()).item(), 5)
                    runs[json.dumps(cfg)] = (cfg, f)
                except Exception as e:
                    cfg["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    print(json.dumps(cfg), flush=True)
    times = round_robin(runs, reps=60, turns=3 if dev == "cuda" else 0)
    for k, (cfg, _) in runs.items():
        print(json.dumps({"M": M, "K": K, "N": N, **(cfg or {"case": k}),
                          **({"ms": round(min(times[k]), 4)} if times[k] else {})}), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=["2NK"])
    args = ap.parse_args()
    if torch.cuda.is_available():
        main(8192, 2048, 5632, "cuda", torch.bfloat16, args.layouts)
        main(8192, 4096, 11008, "cuda", torch.bfloat16, args.layouts)
    else:
        main(64, 64, 64, "cpu", torch.float16, args.layouts)

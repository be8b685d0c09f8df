"""Whether the SwiGLU pair kernel's epilogue (~1 us a 128x256 tile on an H200: two MUFU ops an
element, bound by the SFU's 16 a clock per SM) can hide behind another tile's MMAs: two
persistent programs an SM (smaller tiles, 4 warps, so registers and shared memory allow two),
against one program an SM with the kernel's default tile; and a cheaper sigmoid (ex2.approx.ftz
and rcp.approx.ftz: five instructions an element instead of twelve) in either. Gate and up are
read through the [2, N, K] view (as kiln reads them), the output stored through a descriptor.

    python bench/probe_pingpong.py     (an sm90+ GPU; TRITON_INTERPRET=1 on a CPU: fp16, small)
"""
import json, os, sys
import torch, triton, triton.language as tl
import torch.nn.functional as F
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_dual_dot import _tile, round_robin, trial  # noqa: E402
from probe_pair_rows import pair_products, view  # noqa: E402


@triton.jit
def _rcp(x):
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def swiglu(a_desc, w_desc, out_desc, M, N, K, BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
           GROUP_M: tl.constexpr, NUM_PROGS: tl.constexpr, FLATTEN: tl.constexpr, SWAP: tl.constexpr,
           EPI: tl.constexpr):
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BH)
    npg = GROUP_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGS, flatten=FLATTEN):
        pid_m, pid_n = _tile(tile, npg, num_pid_m, GROUP_M)
        g, u = pair_products(a_desc, w_desc, pid_m, pid_n, K, BM, BH, BK, SWAP)
        g = g.to(out_desc.dtype).to(tl.float32)
        u = u.to(out_desc.dtype).to(tl.float32)
        if EPI == 0:
            s = g * tl.sigmoid(g)
        else:
            s = g * _rcp(1.0 + tl.exp2(g * -1.4426950408889634))
        o = s.to(out_desc.dtype).to(tl.float32) * u
        out_desc.store([pid_m * BM, pid_n * BH], o.to(out_desc.dtype))


def main(M, K, N, dev, dt):
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 3
    x = torch.randn(M, K, device=dev, dtype=dt)
    wg = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
    junk = torch.empty(1000, device=dev, dtype=dt)              # noqa: F841 (the weights are not adjacent)
    wu = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
    ref = F.silu(F.linear(x.float(), wg.float())) * F.linear(x.float(), wu.float())
    out = torch.empty(M, N, device=dev, dtype=dt)
    runs = {}
    if dev == "cuda":
        runs["cublas"] = ({"case": "cublas two products"}, lambda: (F.linear(x, wg), F.linear(x, wu)))
        runs["eager"] = ({"case": "eager silu(gate) * up"}, lambda: F.silu(F.linear(x, wg)) * F.linear(x, wu))
        cfgs = [(128, 128, 64, 8, 3, True, 1, epi) for epi in (0, 1)]            # kiln's default, 1 an SM
        cfgs += [(128, 128, 64, 8, 4, True, 1, epi) for epi in (0, 1)]
        # two an SM: shared memory 114,712 B (128x64x64, 3 stages) and 81,952 (128x64x32, 4 stages) each
        cfgs += [(128, 64, 64, 4, 3, fl, occ, epi) for fl in (True, False) for occ in (1, 2) for epi in (0, 1)]
        cfgs += [(128, 64, 32, 4, st, fl, 2, epi) for st in (3, 4) for fl in (True, False) for epi in (0, 1)]
    else:
        cfgs = [(32, 16, 16, 4, 2, False, occ, epi) for occ in (1, 2) for epi in (0, 1)]
    for BM, BH, BK, w, st, fl, occ, epi in cfgs:
        cfg = dict(BM=BM, BH=BH, BK=BK, warps=w, stages=st, flatten=fl, progs_per_sm=occ, epi=["sigmoid", "rcp"][epi])
        a_d = TensorDescriptor.from_tensor(x, [BM, BK])
        w_d, swap = view(wg, wu, 0, BH, BK)
        o_d = TensorDescriptor.from_tensor(out, [BM, BH])
        g = (min(occ * sms, triton.cdiv(M, BM) * triton.cdiv(N, BH)),)
        f = (lambda a_d=a_d, w_d=w_d, o_d=o_d, g=g, BM=BM, BH=BH, BK=BK, fl=fl, swap=swap, w=w, st=st, epi=epi:
             swiglu[g](a_d, w_d, o_d, M, N, K, BM=BM, BH=BH, BK=BK, GROUP_M=16, NUM_PROGS=g[0],
                       FLATTEN=fl, SWAP=swap, EPI=epi, num_warps=w, num_stages=st))
        trial(runs, cfg, f, out, ref)
    times = round_robin(runs, reps=30, turns=3 if dev == "cuda" else 0)
    base = min(times["cublas"]) if dev == "cuda" else None
    for k, (cfg, _) in sorted(runs.items(), key=lambda kv: min(times[kv[0]] or [0])):
        t = min(times[k]) if times[k] else None
        print(json.dumps({"M": M, "K": K, "N": N, **cfg, **({"ms": round(t, 4), "vs_cublas": round(t / base, 3)}
                                                            if t and base else {})}), flush=True)


if __name__ == "__main__":
    if torch.cuda.is_available():
        main(8192, 2048, 5632, "cuda", torch.bfloat16)       # the suite's Llama layer
        main(8192, 4096, 11008, "cuda", torch.bfloat16)      # the suite's SwiGLU MLP
    else:
        main(64, 64, 64, "cpu", torch.float16)

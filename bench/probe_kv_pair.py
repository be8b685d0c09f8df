"""Whether GQA's k and v projections (one A, two small weights of one shape, no epilogue) run
faster as one persistent TMA launch over both weights (the [2, N, K] view of the SwiGLU pair,
each half of the accumulator stored to its own output) than as cuBLAS's two products, which
leave most of an H200 idle (Llama's k and v: 8192x2048 -> 256 each, 128 tiles of 128x128).
References in the same round robin: one cuBLAS product over the weights concatenated (an
interleaved output kiln cannot use as is) and q, k, v as three products or one.

    python bench/probe_kv_pair.py     (an sm90+ GPU; TRITON_INTERPRET=1 on a CPU: fp16, small)
"""
import json, os, sys
import torch, triton, triton.language as tl
import torch.nn.functional as F
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_dual_dot import _tile, round_robin, trial  # noqa: E402
from probe_pair_rows import pair_products, view  # noqa: E402


@triton.jit
def kv_pair(a_desc, w_desc, k_desc, v_desc, M, N, K, BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
            GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, SWAP: tl.constexpr):
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BH)
    npg = GROUP_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile(tile, npg, num_pid_m, GROUP_M)
        kk, vv = pair_products(a_desc, w_desc, pid_m, pid_n, K, BM, BH, BK, SWAP)
        k_desc.store([pid_m * BM, pid_n * BH], kk.to(k_desc.dtype))
        v_desc.store([pid_m * BM, pid_n * BH], vv.to(v_desc.dtype))


def main(M, K, NQ, N, dev, dt):
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 3
    x = torch.randn(M, K, device=dev, dtype=dt)
    wq = torch.randn(NQ, K, device=dev, dtype=dt) / K ** 0.5
    wk = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
    junk = torch.empty(1000, device=dev, dtype=dt)              # noqa: F841 (the weights are not adjacent)
    wv = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
    ref = F.linear(x.float(), wk.float())
    kout, vout = torch.empty(M, N, device=dev, dtype=dt), torch.empty(M, N, device=dev, dtype=dt)
    runs = {}
    if dev == "cuda":
        wkv, wqkv = torch.cat([wk, wv]), torch.cat([wq, wk, wv])
        runs["cublas k, v"] = ({"case": "cublas k, v"}, lambda: (F.linear(x, wk), F.linear(x, wv)))
        runs["cublas [k;v]"] = ({"case": "cublas [k;v] (interleaved out)"}, lambda: F.linear(x, wkv))
        runs["cublas q, k, v"] = ({"case": "cublas q, k, v"}, lambda: (F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)))
        runs["cublas [q;k;v]"] = ({"case": "cublas [q;k;v] (interleaved out)"}, lambda: F.linear(x, wqkv))
        runs["cublas q"] = ({"case": "cublas q"}, lambda: F.linear(x, wq))
        cfgs = [(bm, bh, bk, w, st, fl, 8) for bm, bh, bk in ((128, 128, 64), (128, 64, 64), (64, 128, 64),
                                                            (128, 128, 128))
                for w in (4, 8) for st in (3, 4) for fl in (False, True)]
    else:
        cfgs = [(32, 16, 16, 4, 2, False, 4)]
    for BM, BH, BK, w, st, fl, gm in cfgs:
        cfg = dict(BM=BM, BH=BH, BK=BK, warps=w, stages=st, flatten=fl, group_m=gm)
        a_d = TensorDescriptor.from_tensor(x, [BM, BK])
        w_d, swap = view(wk, wv, 0, BH, BK)
        k_d, v_d = TensorDescriptor.from_tensor(kout, [BM, BH]), TensorDescriptor.from_tensor(vout, [BM, BH])
        g = (min(sms, triton.cdiv(M, BM) * triton.cdiv(N, BH)),)
        f = (lambda a_d=a_d, w_d=w_d, k_d=k_d, v_d=v_d, g=g, BM=BM, BH=BH, BK=BK, fl=fl, swap=swap, w=w, st=st, gm=gm:
             kv_pair[g](a_d, w_d, k_d, v_d, M, N, K, BM=BM, BH=BH, BK=BK, GROUP_M=gm, NUM_SMS=g[0],
                        FLATTEN=fl, SWAP=swap, num_warps=w, num_stages=st))
        trial(runs, cfg, f, kout, ref)
        if "err" in cfg:
            cfg["err_v"] = round(((vout.float() - F.linear(x.float(), wv.float())).norm()
                                  / vout.float().norm()).item(), 5)
    times = round_robin(runs, reps=100, turns=3 if dev == "cuda" else 0)
    base = min(times["cublas k, v"]) if dev == "cuda" else None
    for k, (cfg, _) in sorted(runs.items(), key=lambda kv: min(kv[1] and times[kv[0]] or [0])):
        t = min(times[k]) if times[k] else None
        print(json.dumps({"M": M, "K": K, "N": N, **cfg, **({"ms": round(t, 4), "vs_cublas_kv": round(t / base, 3)}
                                                            if t and base else {})}), flush=True)


if __name__ == "__main__":
    if torch.cuda.is_available():
        main(8192, 2048, 2048, 256, "cuda", torch.bfloat16)       # Llama layer of the suite (TinyLlama)
        main(8192, 4096, 4096, 1024, "cuda", torch.bfloat16)      # Llama-3-8B's shapes
    else:
        main(64, 64, 64, 32, "cpu", torch.float16)

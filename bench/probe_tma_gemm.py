"""Feasibility: one persistent TMA Triton GEMM over gate/up weights interleaved in half-tiles,
SwiGLU in its epilogue, against cuBLAS (+ a fused silu*mul pass) and Inductor. Llama layer shape.

    PYTHONPATH=$PWD python bench/probe_tma_gemm.py [M K N]     (an sm90+ GPU; QUICK=1 TRITON_INTERPRET=1 on a CPU)
"""
import json
import os
import sys

import torch, triton, triton.language as tl
import torch.nn.functional as F
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_dual_dot import bench  # noqa: E402  (one timing loop for the probes)

@triton.jit
def _pid(tile_id, num_pid_in_group, num_pid_m, GROUP_M: tl.constexpr):
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    gsz = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % gsz)
    pid_n = (tile_id % num_pid_in_group) // gsz
    return pid_m, pid_n

@triton.jit
def gemm_persistent(a_desc, b_desc, c_desc, M, N, K,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    NUM_SMS: tl.constexpr, SWIGLU: tl.constexpr, WS: tl.constexpr, FLATTEN: tl.constexpr):
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    tile_c = start - NUM_SMS
    for tile_id in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WS):
        pid_m, pid_n = _pid(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        om = pid_m * BM
        on = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            ok = ki * BK
            a = a_desc.load([om, ok])
            b = b_desc.load([on, ok])
            acc = tl.dot(a, b.T, acc)
        tile_c += NUM_SMS
        pid_m, pid_n = _pid(tile_c, num_pid_in_group, num_pid_m, GROUP_M)
        if SWIGLU:
            acc3 = tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1))
            g, u = tl.split(acc3)
            out = g / (1.0 + tl.exp(-g)) * u
            c_desc.store([pid_m * BM, pid_n * (BN // 2)], out.to(tl.bfloat16))
        else:
            c_desc.store([pid_m * BM, pid_n * BN], acc.to(tl.bfloat16))

@triton.jit
def gemm_tiled(a_desc, b_desc, c_desc, M, N, K,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
               NUM_SMS: tl.constexpr, SWIGLU: tl.constexpr, WS: tl.constexpr, FLATTEN: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    pid_m, pid_n = _pid(pid, GROUP_M * num_pid_n, num_pid_m, GROUP_M)
    om = pid_m * BM
    on = pid_n * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for ki in tl.range(tl.cdiv(K, BK), warp_specialize=WS):
        ok = ki * BK
        a = a_desc.load([om, ok])
        b = b_desc.load([on, ok])
        acc = tl.dot(a, b.T, acc)
    if SWIGLU:
        acc3 = tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1))
        g, u = tl.split(acc3)
        out = g / (1.0 + tl.exp(-g)) * u
        c_desc.store([om, pid_n * (BN // 2)], out.to(tl.bfloat16))
    else:
        c_desc.store([om, on], acc.to(tl.bfloat16))

def interleave(wg, wu, h):
    n, k = wg.shape
    return torch.stack([wg.reshape(n // h, h, k), wu.reshape(n // h, h, k)], 1).reshape(2 * n, k).contiguous()


def main(M, K, NI):
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 4
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    wg = torch.randn(NI, K, device=dev, dtype=torch.bfloat16) / K ** 0.5
    wu = torch.randn(NI, K, device=dev, dtype=torch.bfloat16) / K ** 0.5
    wgu = torch.cat([wg, wu]).contiguous()
    ref = (F.silu(F.linear(x.float(), wg.float())) * F.linear(x.float(), wu.float()))
    res = {"shape": [M, K, NI]}
    flops = 2 * M * K * 2 * NI
    if dev == "cuda":
        res["cublas_gemm"] = bench(lambda: F.linear(x, wgu))
        gu = F.linear(x, wgu)
        epi = torch.compile(lambda gu: F.silu(gu[:, :NI]) * gu[:, NI:])
        res["inductor_epilogue_pass"] = bench(lambda: epi(gu))
        ind = torch.compile(lambda x: F.silu(F.linear(x, wg)) * F.linear(x, wu))
        res["inductor_swiglu"] = bench(lambda: ind(x))
        res["eager_swiglu"] = bench(lambda: F.silu(F.linear(x, wg)) * F.linear(x, wu))
    print(json.dumps(res), flush=True)
    rows = []
    tiles_cfg = [(128, 128, 64, 4), (128, 128, 64, 8), (128, 256, 64, 8), (256, 128, 64, 8),
                 (128, 128, 128, 4), (128, 128, 128, 8), (128, 256, 128, 8)]
    if os.environ.get("QUICK"):
        tiles_cfg = [(32, 32, 32, 4)]
    def run_cfg(kern_name, BM, BN, BK, warps, stages, ws, swiglu):
        kern = gemm_persistent if kern_name == "persistent" else gemm_tiled
        cfg = dict(kern=kern_name, BM=BM, BN=BN, BK=BK, stages=stages, warps=warps, ws=ws, swiglu=swiglu)
        try:
            wi = interleave(wg, wu, BN // 2)
            a_d = TensorDescriptor.from_tensor(x, [BM, BK])
            b_d = TensorDescriptor.from_tensor(wi, [BN, BK])
            if swiglu:
                out = torch.empty(M, NI, device=dev, dtype=torch.bfloat16)
                c_d = TensorDescriptor.from_tensor(out, [BM, BN // 2])
            else:
                out = torch.empty(M, 2 * NI, device=dev, dtype=torch.bfloat16)
                c_d = TensorDescriptor.from_tensor(out, [BM, BN])
            tiles = triton.cdiv(M, BM) * triton.cdiv(2 * NI, BN)
            grid = (min(sms, tiles),) if kern_name == "persistent" else (tiles,)
            f = lambda: kern[grid](a_d, b_d, c_d, M, 2 * NI, K, BM=BM, BN=BN, BK=BK, GROUP_M=8,
                                   NUM_SMS=sms, SWIGLU=swiglu, WS=ws, FLATTEN=not ws,
                                   num_warps=warps, num_stages=stages)
            f()
            want = ref if swiglu else F.linear(x.float(), wi.float())
            cfg["err"] = ((out.float() - want).norm() / want.norm()).item()
            if dev == "cuda":
                t = bench(f)
                cfg.update(ms=t, tflops=flops / t / 1e9)
        except Exception as e:
            cfg.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}")
        rows.append(cfg)
        print(json.dumps(cfg), flush=True)
        return cfg
    for kern_name in ("persistent", "tiled"):
        for BM, BN, BK, warps in tiles_cfg:
            for stages in (3, 4):
                for ws in ((False, True) if kern_name == "persistent" else (False,)):
                    run_cfg(kern_name, BM, BN, BK, warps, stages, ws, True)
    top = sorted([r for r in rows if "ms" in r], key=lambda r: r["ms"])[:3]
    for r in top:
        run_cfg(r["kern"], r["BM"], r["BN"], r["BK"], r["warps"], r["stages"], r["ws"], False)
    ok = [r for r in rows if "ms" in r]
    for sw in (True, False):
        best = sorted([r for r in ok if r["swiglu"] == sw], key=lambda r: r["ms"])[:5]
        print("BEST swiglu" if sw else "BEST plain", json.dumps(best), flush=True)
    if dev == "cuda":
        print("cublas+pass", res["cublas_gemm"] + res["inductor_epilogue_pass"], "inductor", res["inductor_swiglu"])

if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (8192, 2048, 5632))

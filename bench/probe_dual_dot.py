"""Why kiln's two-product TMA kernel (gate and up, two B descriptors, two dots a K step) ran at
0.67 ms where one dot over interleaved weights ran 0.49: variants side by side.

    python bench/probe_dual_dot.py     (an sm90+ GPU)
"""
import json
import torch, triton, triton.language as tl
import torch.nn.functional as F
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _tile(tile, num_pid_in_group, num_pid_m, GROUP_M: tl.constexpr):
    group_id = tile // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    gsz = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + ((tile % num_pid_in_group) % gsz), (tile % num_pid_in_group) // gsz


@triton.jit
def dual(a_desc, g_desc, u_desc, out, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
         GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, VARIANT: tl.constexpr, FLATTEN: tl.constexpr):
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    npg = GROUP_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile(tile, npg, num_pid_m, GROUP_M)
        acc0 = tl.zeros((BM, BN), dtype=tl.float32)
        acc1 = tl.zeros((BM, BN), dtype=tl.float32)
        if VARIANT == 0:        # two dots a K step
            for k0 in range(0, K, BK):
                a = a_desc.load([pid_m * BM, k0])
                acc0 = tl.dot(a, g_desc.load([pid_n * BN, k0]).T, acc0)
                acc1 = tl.dot(a, u_desc.load([pid_n * BN, k0]).T, acc1)
        else:                   # two K loops, one dot each
            for k0 in range(0, K, BK):
                acc0 = tl.dot(a_desc.load([pid_m * BM, k0]), g_desc.load([pid_n * BN, k0]).T, acc0)
            for k0 in range(0, K, BK):
                acc1 = tl.dot(a_desc.load([pid_m * BM, k0]), u_desc.load([pid_n * BN, k0]).T, acc1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        g = acc0.to(tl.bfloat16).to(tl.float32)
        u = acc1.to(tl.bfloat16).to(tl.float32)
        o = (g / (1.0 + tl.exp(-g))).to(tl.bfloat16).to(tl.float32) * u
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(out + rm[:, None] * N + rn[None, :], o.to(tl.bfloat16), mask=mask)


def bench(fn, reps=30, rounds=5):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rounds):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        for _ in range(reps): fn()
        e.record(); e.synchronize()
        ts.append(s.elapsed_time(e) / reps)
    return sorted(ts)[len(ts) // 2]


def trial(runs: dict, cfg: dict, f, out, ref, width=160) -> None:
    """Run ``f`` once into ``out``: its relative error against ``ref`` joins ``cfg`` and it joins
    ``runs`` (json(cfg) -> (cfg, f)), or the error (a config that does not compile or fit) is
    printed instead."""
    import json
    try:
        out.zero_()
        f()
        if out.is_cuda:
            torch.cuda.synchronize()
        cfg["err"] = round(((out.float() - ref).norm() / ref.norm()).item(), 5)
        runs[json.dumps(cfg)] = (cfg, f)
    except Exception as e:
        cfg["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:width] if str(e) else ''}"
        print(json.dumps(cfg), flush=True)


def round_robin(runs: dict, reps: int, turns: int = 3) -> dict:
    """Each run's times over ``turns`` passes through all of them (a clock or neighbour change
    hits all alike): name -> list of ms."""
    times = {k: [] for k in runs}
    for _ in range(turns):
        for k, (_, f) in runs.items():
            times[k].append(bench(f, reps=reps, rounds=5))
    return times


def report(runs: dict, times: dict, dims: dict, base: str, key: str) -> None:
    """One JSON line per run, fastest first: its config, best time and ratio to run ``base``."""
    ref = min(times[base])
    for k, (cfg, _) in sorted(runs.items(), key=lambda kv: min(times[kv[0]])):
        t = min(times[k])
        print(json.dumps({**dims, **(cfg or {"case": k}), "ms": round(t, 4), key: round(t / ref, 3)}), flush=True)


def main(M=8192, K=2048, N=5632):
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    wg = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    wu = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    ref = F.silu(F.linear(x, wg)) * F.linear(x, wu)
    print(json.dumps({"cublas_two_mm": bench(lambda: (F.linear(x, wg), F.linear(x, wu))),
                      "eager": bench(lambda: F.silu(F.linear(x, wg)) * F.linear(x, wu))}), flush=True)
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    for variant in (0, 1):
        for BM, BN, BK, w, st in [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (128, 64, 64, 8, 4),
                                  (64, 128, 64, 4, 4), (128, 128, 32, 8, 5), (256, 64, 64, 8, 3), (128, 128, 64, 4, 3)]:
            for flatten in (True, False):
                cfg = dict(variant=variant, BM=BM, BN=BN, BK=BK, warps=w, stages=st, flatten=flatten)
                try:
                    a_d = TensorDescriptor.from_tensor(x, [BM, BK])
                    g_d = TensorDescriptor.from_tensor(wg, [BN, BK])
                    u_d = TensorDescriptor.from_tensor(wu, [BN, BK])
                    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
                    grid = (min(sms, tiles),)
                    f = lambda: dual[grid](a_d, g_d, u_d, out, M, N, K, BM=BM, BN=BN, BK=BK, GROUP_M=8, NUM_SMS=grid[0],
                                           VARIANT=variant, FLATTEN=flatten, num_warps=w, num_stages=st)
                    f(); torch.cuda.synchronize()
                    cfg["err"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    cfg["ms"] = bench(f)
                except Exception as e:
                    cfg["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                print(json.dumps(cfg), flush=True)


if __name__ == "__main__":
    main()

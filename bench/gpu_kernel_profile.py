"""Per-kernel GPU time of a suite case under eager-free comparison: TorchInductor and kiln, each
profiled over the same number of calls (torch.profiler, CUDA activity), kernels summed by name.
Shows where kiln's time goes against Inductor's kernel by kernel (which matmuls, which fused ops).

    PYTHONPATH=$PWD python bench/gpu_kernel_profile.py llama_layer gpt2_block [--top 14]
"""
import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases as C  # noqa: E402
import kiln  # noqa: E402


def profile(fn, inputs, iters: int) -> dict[str, tuple[float, int]]:
    for _ in range(3):
        fn(*inputs)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn(*inputs)
        torch.cuda.synchronize()
    total: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            total[e.name][0] += e.device_time_total / iters / 1000.0      # ms per call
            total[e.name][1] += 1
    return {k: (v[0], v[1] // iters) for k, v in total.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+", choices=sorted(C.CASES))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--top", type=int, default=14)
    a = ap.parse_args()
    for name in a.cases:
        _, factory, desc = C.CASES[name]
        torch.manual_seed(0)
        fn, inputs = factory("cuda", False)
        print(f"## {desc}")
        with torch.no_grad():
            for backend in ("inductor", "kiln"):
                torch._dynamo.reset()
                f = torch.compile(fn, dynamic=False) if backend == "inductor" else \
                    kiln.compile(fn, target="triton", cudagraphs=False)
                prof = profile(f, inputs, a.iters)
                tot = sum(t for t, _ in prof.values())
                print(f"{backend}: {tot:.4f} ms of kernels per call, {sum(n for _, n in prof.values())} launches")
                for k, (t, n) in sorted(prof.items(), key=lambda kv: -kv[1][0])[:a.top]:
                    print(f"  {t:8.4f} ms  x{n:<3d} {k[:110]}")


if __name__ == "__main__":
    main()

"""Per-call host overhead of a kiln-compiled function vs Inductor and eager on tiny inputs
(where GPU time is negligible, the time per call is the launch path).

    python bench/gpu_overhead.py [--profile]
"""
import argparse
import cProfile
import pstats
import time

import torch

import kiln


def per_call_us(f, n=2000):
    for _ in range(50):
        f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    x = torch.randn(16, 16, device="cuda")
    fn = lambda x: torch.softmax(x, -1)  # noqa: E731
    k = kiln.compile(fn, target="triton")
    i = torch.compile(fn)
    print(f"host us/call: eager {per_call_us(lambda: fn(x)):.1f}, inductor {per_call_us(lambda: i(x)):.1f}, "
          f"kiln {per_call_us(lambda: k(x)):.1f}")
    if args.profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(1000):
            k(x)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(12)

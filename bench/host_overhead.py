"""Per-call host time of a many-step graph (a BERT layer at tiny sizes, so kernels cost next to
nothing): eager vs TorchInductor vs kiln's executor (CUDA graph replay off, to time the executor
itself). Best of 5 loops of N calls, in microseconds per call.

    python bench/host_overhead.py [--device cpu|cuda] [--calls 300] [--profile]
"""
import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases as C  # noqa: E402
import kiln  # noqa: E402


def per_call_us(f, inputs, n: int, sync) -> float:
    best = float("inf")
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            f(*inputs)
        sync()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--profile", action="store_true", help="cProfile kiln's calls (top functions by own time)")
    args = ap.parse_args(argv)
    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    torch.manual_seed(0)
    fn, inputs = C.CASES["bert_layer"][1](dev, True)
    inputs = tuple(x[:1, :8] for x in inputs)
    with torch.no_grad():
        k = kiln.compile(fn, target="triton" if dev == "cuda" else "cpu", cudagraphs=False)
        ind = torch.compile(fn)
        for f in (k, ind, k, ind):
            f(*inputs)
        res = {name: per_call_us(f, inputs, args.calls, sync) for name, f in (("eager", fn), ("inductor", ind),
                                                                                  ("kiln", k))}
        steps = len(kiln.last_report().kernels)
        print(f"{dev}: host us/call (BERT layer, tiny; kiln {steps} kernel/ATen steps): "
              + ", ".join(f"{n} {t:.0f}" for n, t in res.items()))
        if args.profile:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(args.calls):
                k(*inputs)
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()

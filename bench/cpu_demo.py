"""The demo model on the CPU: eager vs kiln (and kiln without the cpu-only addmm pass), compiled
side by side in one process and timed round-robin, so load on a shared machine hits all alike.

    python bench/cpu_demo.py [--calls 40]

Prints each variant's median and fastest call and kiln's speed-up over eager (ratios are the
figures to quote; see bench/RESULTS.md)."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import kiln
import kiln.passes.pipeline as pipeline
from kiln.demo import FULL, make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=40)
    args = ap.parse_args()
    model, inputs = make(FULL)
    with torch.no_grad():
        fns = {"eager": model, "kiln": kiln.compile(model, target="cpu")}
        fns["kiln"](*inputs)
        saved = list(pipeline.PIPELINE)
        pipeline.PIPELINE[:] = [p for p in saved if p[0] != "addmm"]
        try:
            torch._dynamo.reset()
            fns["kiln, no addmm pass"] = kiln.compile(model, target="cpu")
            fns["kiln, no addmm pass"](*inputs)
        finally:
            pipeline.PIPELINE[:] = saved
        times = {k: [] for k in fns}
        for _ in range(3):
            for f in fns.values():
                f(*inputs)
        for _ in range(args.calls):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f(*inputs)
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k}: median {med[k] * 1e3:.2f} ms, fastest {min(v) * 1e3:.2f} ms")
    print(f"kiln vs eager: {med['eager'] / med['kiln']:.2f}x; without the addmm pass "
          f"{med['eager'] / med['kiln, no addmm pass']:.2f}x")


if __name__ == "__main__":
    main()

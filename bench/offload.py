"""Weights 3x larger than the device budget: kiln's tier plan vs per-layer onload/offload hooks
vs everything on the device.

A stack of MLP blocks (x + W2 gelu(W1 x), bf16, no bias) whose weights are 3.3x the budget
(memory_budget = 30% of the weights; the budget covers activations and the arena too). Per
workload (decode-like: one token; prefill-like: 2048 tokens; larger batches of 8192 and 12288) it times:
  on_device  kiln, weights on the GPU (the all-on-device run)
  naive      eager, weights in pageable host memory; each block's pre-hook moves it to the GPU
             (module.to) and its post-hook moves it back (module.to('cpu'))
  pinned     eager, weights in pinned host memory; a pre-hook copies the block's weights to the
             GPU and the post-hook drops them (no write-back, no overlap: accelerate-style)
  kiln       kiln.aot with memory_budget: copies on a side stream as the plan says, the device
             tier asserted after every step
and checks kiln's outputs against eager on the device.

    PYTHONPATH=$PWD python bench/offload.py [--small] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.w2(F.gelu(self.w1(x)))


class Stack(nn.Module):
    def __init__(self, d, h, layers):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(layers))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def timed(fn, x, reps, sync, warm=2):
    for _ in range(warm):
        out = fn(x)
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn(x)
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def h2d_bandwidth(nbytes=1 << 28) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * nbytes / (time.perf_counter() - t)


def hooks_naive(model):
    for b in model.blocks:
        b.register_forward_pre_hook(lambda m, a: m.to("cuda") and None)
        b.register_forward_hook(lambda m, a, o: m.to("cpu") and None)
    return model


def hooks_pinned(model):
    for b in model.blocks:
        host = {n: p.data.pin_memory() for n, p in b.named_parameters()}
        for n, p in b.named_parameters():
            p.data = host[n]

        def pre(m, a, host=host):
            for n, p in m.named_parameters():
                p.data = host[n].to("cuda", non_blocking=True)

        def post(m, a, o, host=host):
            for n, p in m.named_parameters():
                p.data = host[n]
        b.register_forward_pre_hook(pre)
        b.register_forward_hook(post)
    return model


def main():
    from kiln.aot import compile_ahead

    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="a small model (quick check)")
    ap.add_argument("--json")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--planner", default="greedy")
    ap.add_argument("--workloads", nargs="+", default=["decode", "prefill", "large", "xlarge"])
    args = ap.parse_args()
    d, h, layers = (1024, 4096, 8) if args.small else (4096, 16384, 16)
    work = {"decode": 1, "prefill": 2048, "large": 8192, "xlarge": 12288}
    if args.small:
        work = {"decode": 1, "prefill": 256, "large": 1024}
    torch.manual_seed(0)
    cpu_model = Stack(d, h, layers).to(torch.bfloat16).eval()
    wbytes = sum(p.numel() * p.element_size() for p in cpu_model.parameters())
    budget = int(0.3 * wbytes)
    bw = h2d_bandwidth()
    sync = torch.cuda.synchronize
    dev_model = Stack(d, h, layers).to(torch.bfloat16).eval()
    dev_model.load_state_dict(cpu_model.state_dict())
    dev_model = dev_model.cuda()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "weights_bytes": wbytes,
               "budget_bytes": budget, "h2d_bytes_per_s": bw, "d": d, "hidden": h, "layers": layers, "cases": {}}
    print(f"weights {wbytes / 2**30:.2f} GiB, budget {budget / 2**30:.2f} GiB, pinned H2D {bw / 1e9:.1f} GB/s")
    naive = hooks_naive(Stack(d, h, layers).to(torch.bfloat16).eval())
    naive.load_state_dict(cpu_model.state_dict())
    pinned = Stack(d, h, layers).to(torch.bfloat16).eval()
    pinned.load_state_dict(cpu_model.state_dict())
    pinned = hooks_pinned(pinned)
    tiers = ["device", {"name": "host", "bandwidth": int(bw)}]
    for name, tokens in work.items():
        if name not in args.workloads:
            continue
        x_cpu = torch.randn(tokens, d, dtype=torch.bfloat16)
        x = x_cpu.cuda()
        row = {"tokens": tokens}
        with torch.no_grad():
            t0 = time.perf_counter()
            try:
                tiered, rep = compile_ahead(cpu_model, (x_cpu,),
                                            {"target": "triton", "memory_budget": budget, "tiers": tiers,
                                             "planner": args.planner})
            except ValueError as e:           # the budget cannot hold this workload's activations
                print(f"{name:8s} tokens {tokens:5d}: {e}", flush=True)
                results["cases"][name] = {"tokens": tokens, "error": str(e)}
                continue
            compile_s = time.perf_counter() - t0
            ref = dev_model(x)
            t_eager, _ = timed(dev_model, x, args.reps, sync)
            on_dev, _ = compile_ahead(dev_model, (x,), {"target": "triton"})
            t_dev, _ = timed(lambda a: on_dev(a)[0], x, args.reps, sync)
            t_naive, out_n = timed(naive, x, 1, sync, warm=1)         # seconds per call: once is enough
            t_pin, out_p = timed(pinned, x, args.reps, sync)
            t_kiln, out_k = timed(lambda a: tiered(a)[0], x, args.reps, sync)
        err = ((out_k.float() - ref.float()).norm() / ref.float().norm()).item()
        st = tiered._tiers.stats
        sched = tiered.graph.meta["cache_schedule"]
        row.update(eager_ms=t_eager * 1e3, on_device_ms=t_dev * 1e3, naive_ms=t_naive * 1e3, pinned_ms=t_pin * 1e3,
                   kiln_ms=t_kiln * 1e3, simulated_ms=sched.sim["time_s"] * 1e3, rel_err=err,
                   speedup_vs_naive=t_naive / t_kiln, speedup_vs_pinned=t_pin / t_kiln,
                   slowdown_vs_on_device=t_kiln / t_dev, max_device_bytes=st["max_device_bytes"],
                   loaded_bytes_per_call=sched.sim["transfer_bytes"], persistent_bytes=sched.sim["warmup_bytes"],
                   pool_bytes=sched.pool_bytes, compile_s=compile_s, report_memory=rep.memory,
                   naive_err=((out_n.float() - ref.float()).norm() / ref.float().norm()).item())
        assert st["max_device_bytes"] <= budget
        results["cases"][name] = row
        print(f"{name:8s} tokens {tokens:5d}: on-device {t_dev*1e3:8.2f} ms | naive {t_naive*1e3:8.2f} | "
              f"pinned {t_pin*1e3:8.2f} | kiln {t_kiln*1e3:8.2f} (sim {sched.sim['time_s']*1e3:7.2f}) | "
              f"{t_naive/t_kiln:.2f}x naive, {t_pin/t_kiln:.2f}x pinned, {t_kiln/t_dev:.2f}x on-device | "
              f"err {err:.1e} | dev max {st['max_device_bytes']/2**30:.3f} GiB, moved/call "
              f"{sched.sim['transfer_bytes']/2**30:.2f} GiB", flush=True)
        tiered = on_dev = None
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()

"""GPU fusion micro-benchmarks: kiln vs eager vs TorchInductor vs the HBM roofline, one process.

Cases (bf16): bias+GELU+residual 16384x4096, add+RMSNorm 16384x4096 (returns the sum and the
normalised output), softmax 4096x8192, layernorm 16384x4096. The roofline is the bytes each case
must move (inputs read once, outputs written once) over the copy bandwidth measured in this run
(a 1 GiB copy). ``--long-rows`` adds rows longer than one block (walked in loops): an LM head's
softmax 4096x32000, log_softmax and cross-entropy over 4096x50257 bf16 logits (fp32 math, as
models write it), layernorm 2048x16384. A second column times a copy of the case's own byte count: smaller copies do not
reach the 1 GiB rate (on an H200 a 64 MiB copy runs at 88% of it), so it is the tighter ceiling.
"GPU ms" is the kernels' time per call from a CUDA profile, without the host's share.

    python bench/gpu_fusion.py [--json out.json] [--reps 200] [--long-rows]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

os.environ.setdefault("KILN_CACHE_DIR", tempfile.mkdtemp(prefix="kiln-bench-"))
import kiln  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

F = torch.nn.functional


def bias_gelu_residual(x, b, r):
    return F.gelu(x + b) + r


def add_rmsnorm(x, r, w):
    h = x + r
    hf = h.float()
    return h, (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype) * w


def softmax(x):
    return torch.softmax(x, -1)


def layernorm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def cases(dev):
    bf = torch.bfloat16
    M, N = 16384, 4096
    x = torch.randn(M, N, device=dev, dtype=bf)
    r = torch.randn(M, N, device=dev, dtype=bf)
    v = torch.randn(N, device=dev, dtype=bf)
    w = torch.rand(N, device=dev, dtype=bf) + 0.5
    s = torch.randn(4096, 8192, device=dev, dtype=bf)
    el = 2
    return [
        ("bias+GELU+residual 16384x4096", bias_gelu_residual, (x, v, r), 3 * M * N * el),
        ("add+RMSNorm 16384x4096", add_rmsnorm, (x, r, w), 4 * M * N * el),
        ("softmax 4096x8192", softmax, (s,), 2 * 4096 * 8192 * el),
        ("layernorm 16384x4096", layernorm, (x, w, v), 2 * M * N * el),
    ]


def log_softmax_fp32(x):
    return torch.log_softmax(x.float(), -1)


def cross_entropy_fp32(x, t):
    return F.cross_entropy(x.float(), t)


def long_row_cases(dev):
    bf = torch.bfloat16
    s = torch.randn(4096, 32000, device=dev, dtype=bf)
    v = torch.randn(4096, 50257, device=dev, dtype=bf)
    t = torch.randint(0, 50257, (4096,), device=dev)
    x = torch.randn(2048, 16384, device=dev, dtype=bf)
    w, b = torch.rand(16384, device=dev, dtype=bf) + 0.5, torch.randn(16384, device=dev, dtype=bf)
    return [
        ("softmax 4096x32000", softmax, (s,), 2 * s.numel() * 2),
        ("log_softmax 4096x50257 (fp32 out)", log_softmax_fp32, (v,), v.numel() * (2 + 4)),
        ("cross_entropy 4096x50257", cross_entropy_fp32, (v, t), v.numel() * 2 + t.numel() * 8),
        ("layernorm 2048x16384", layernorm, (x, w, b), 2 * x.numel() * 2),
    ]


def copy_bandwidth(dev) -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def copy_ms(nbytes: int, dev) -> float:
    """A device copy that reads and writes ``nbytes`` in all (half each way)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")


def device_ms(f, calls: int = 20) -> float:
    """GPU time per call from a CUDA profile (every kernel and copy the call runs): a call can be
    slower than its kernels when the host takes longer to issue it than do_bench's L2 flush runs."""
    f()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
        for _ in range(calls):
            f()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in p.key_averages() if e.device_type.name == "CUDA") / calls / 1e3


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--autotune", action="store_true", help="let kiln time its launch configs first")
    ap.add_argument("--long-rows", action="store_true", help="add the long-row (looped reduction) cases")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_fusion.py needs a CUDA GPU")
    dev = "cuda"
    bw = copy_bandwidth(dev)
    rows = []
    for name, fn, inputs, nbytes in cases(dev) + (long_row_cases(dev) if args.long_rows else []):
        torch._dynamo.reset()
        eager = lambda: fn(*inputs)  # noqa: E731
        ind = torch.compile(fn)
        kl = kiln.compile(fn, target="triton", autotune=args.autotune)
        ref = eager()
        outs = {"kiln": kl(*inputs), "inductor": ind(*inputs)}
        errs = {}
        for k, o in outs.items():
            o = o if isinstance(o, tuple) else (o,)
            rr = ref if isinstance(ref, tuple) else (ref,)
            errs[k] = max(rel_err(a, b) for a, b in zip(o, rr))
        rep = kiln.last_report()
        t = {k: do_bench(f, warmup=25, rep=args.reps, return_mode="median")
             for k, f in (("eager", eager), ("inductor", lambda: ind(*inputs)), ("kiln", lambda: kl(*inputs)))}
        roof_ms = nbytes / bw * 1e3
        same = copy_ms(nbytes, dev)
        dev_ms = {k: device_ms(f) for k, f in (("inductor", lambda: ind(*inputs)), ("kiln", lambda: kl(*inputs)))}
        row = {"case": name, "bytes": nbytes, "roofline_ms": roof_ms, "copy_same_bytes_ms": same,
               **{f"{k}_ms": v for k, v in t.items()},
               **{f"{k}_roofline_frac": roof_ms / v for k, v in t.items()},
               **{f"{k}_copy_frac": same / v for k, v in t.items()},
               **{f"{k}_device_ms": v for k, v in dev_ms.items()},
               "kiln_rel_err": errs["kiln"], "inductor_rel_err": errs["inductor"],
               "kiln_kernels": [k["name"] for k in rep.kernels if k["target"] != "aten"]}
        rows.append(row)
        print(f"{name}: eager {t['eager']:.4f} ms, inductor {t['inductor']:.4f} ms, kiln {t['kiln']:.4f} ms, "
              f"roofline {roof_ms:.4f} ms; kiln {roof_ms / t['kiln']:.1%} of roofline, "
              f"inductor {roof_ms / t['inductor']:.1%}; kiln {same / t['kiln']:.1%} of a same-size copy "
              f"({same:.4f} ms); GPU time per call: kiln {dev_ms['kiln']:.4f} ms, inductor {dev_ms['inductor']:.4f} ms; "
              f"kiln rel err {errs['kiln']:.2e}", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "copy_bandwidth_TBps": bw / 1e12, "kiln_autotune": args.autotune}
    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s (read+write)\n")
    print("| case | eager ms | Inductor ms | kiln ms | roofline ms | Inductor % roof | kiln % roof | "
          "same-size copy ms | Inductor % copy | kiln % copy | kiln / Inductor speed-up | "
          "Inductor GPU ms | kiln GPU ms | kiln GPU % roof |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['eager_ms']:.4f} | {r['inductor_ms']:.4f} | {r['kiln_ms']:.4f} | "
              f"{r['roofline_ms']:.4f} | {r['inductor_roofline_frac']:.0%} | {r['kiln_roofline_frac']:.0%} | "
              f"{r['copy_same_bytes_ms']:.4f} | {r['inductor_copy_frac']:.0%} | {r['kiln_copy_frac']:.0%} | "
              f"{r['inductor_ms'] / r['kiln_ms']:.2f}x | {r['inductor_device_ms']:.4f} | {r['kiln_device_ms']:.4f} | "
              f"{r['roofline_ms'] / r['kiln_device_ms']:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""CPU fusion benchmark: eager vs TorchInductor (C++) vs kiln (numba) on three fused patterns,
fp32 4096x2048, all timed in one process.

    python bench/cpu_fusion.py [--rows 4096 --cols 2048 --runs 30 --warmup 5 --threads N]
                               [--cases gelu,rmsnorm,softmax] [--json PATH]

Targets (issue): kiln >= 2x faster than eager on each case and within 1.25x of Inductor.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

EPS = 1e-6


def bias_gelu_residual(x, b, r):
    return F.gelu(x + b) + r                       # exact GELU (erf)


def add_rmsnorm(x, r, w):
    h = x + r
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * w


def softmax(x):
    return torch.softmax(x, dim=-1)


def make_inputs(case: str, rows: int, cols: int):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if case == "gelu":
        return (rnd(rows, cols), rnd(cols), rnd(rows, cols))
    if case == "rmsnorm":
        return (rnd(rows, cols), rnd(rows, cols), rnd(cols))
    if case == "softmax":
        return (rnd(rows, cols) * 4,)
    raise ValueError(case)


CASES = {
    "gelu": ("bias+GELU(erf)+residual", bias_gelu_residual),
    "rmsnorm": ("add+RMSNorm", add_rmsnorm),
    "softmax": ("softmax(last dim)", softmax),
}


def median_ms(fn, args, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn(*args)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(*args)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def versions() -> dict:
    import numba
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__, "numba": numba.__version__, "python": platform.python_version(),
            "cpu": cpu, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "numba_threads": numba.get_num_threads(), "numba_threading_layer": _layer()}


def _layer() -> str:
    import numba
    try:
        return numba.threading_layer()
    except ValueError:                      # not chosen until the first parallel kernel runs
        return "(not initialised)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--cache-dir", default=None, help="kiln cache dir (default: a fresh temp dir)")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    import numba
    numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    import kiln

    cache_dir = a.cache_dir or tempfile.mkdtemp(prefix="kiln_bench_cpu_")
    results = []
    with torch.no_grad():
        for case in a.cases.split(","):
            title, fn = CASES[case]
            args = make_inputs(case, a.rows, a.cols)
            ref = fn(*args)

            torch._dynamo.reset()
            t0 = time.perf_counter()
            ind = torch.compile(fn, backend="inductor", dynamic=False)
            ind(*args)
            ind_compile = time.perf_counter() - t0

            t0 = time.perf_counter()
            kfn = kiln.compile(fn, target="cpu", cache_dir=cache_dir)
            got = kfn(*args)
            kiln_compile = time.perf_counter() - t0
            rep = kiln.last_report()
            got = got[0] if isinstance(got, (list, tuple)) else got
            err = (got - ref).abs().max().item()
            ok = torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
            kernels = [k["name"] for k in rep.to_dict()["kernels"]] if rep is not None else []

            # interleave the three so drift (thermal, neighbours) hits each alike
            t = {"eager": [], "inductor": [], "kiln": []}
            for f_ in (fn, ind, kfn):
                for _ in range(a.warmup):
                    f_(*args)
            for _ in range(3):
                for name, f_ in (("eager", fn), ("inductor", ind), ("kiln", kfn)):
                    t[name].append(median_ms(f_, args, max(a.runs // 3, 1), 1))
            ms = {k: statistics.median(v) for k, v in t.items()}
            row = {"case": case, "title": title, "shape": [a.rows, a.cols],
                   "eager_ms": ms["eager"], "inductor_ms": ms["inductor"], "kiln_ms": ms["kiln"],
                   "inductor_speedup": ms["eager"] / ms["inductor"], "kiln_speedup": ms["eager"] / ms["kiln"],
                   "kiln_vs_inductor": ms["kiln"] / ms["inductor"], "max_abs_err": err, "match": ok,
                   "kiln_kernels": kernels, "inductor_compile_s": ind_compile, "kiln_compile_s": kiln_compile}
            results.append(row)
            print(f"[{case}] eager {ms['eager']:.2f} ms, inductor {ms['inductor']:.2f} ms, kiln {ms['kiln']:.2f} ms"
                  f" (max abs err {err:.2g}, kernels {len(kernels)})", file=sys.stderr)

    info = versions()
    print(f"\nCPU: {info['cpu']} ({info['cpus']} CPUs), torch {info['torch']} ({info['threads']} threads), "
          f"numba {info['numba']} ({info['numba_threads']} threads, {info['numba_threading_layer']} layer); "
          f"fp32 {a.rows}x{a.cols}, median of {a.runs} runs after {a.warmup} warm-up\n")
    print("| case | eager ms | Inductor ms | kiln ms | Inductor vs eager | kiln vs eager | kiln / Inductor time | "
          "matches eager |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        print(f"| {r['title']} | {r['eager_ms']:.2f} | {r['inductor_ms']:.2f} | {r['kiln_ms']:.2f} | "
              f"{r['inductor_speedup']:.2f}x | {r['kiln_speedup']:.2f}x | {r['kiln_vs_inductor']:.2f} | "
              f"{'yes' if r['match'] else 'NO'} ({r['max_abs_err']:.1g}) |")
    met = all(r["kiln_speedup"] >= 2.0 and r["kiln_vs_inductor"] <= 1.25 and r["match"] for r in results)
    print(f"\ntargets (kiln >= 2x eager and <= 1.25x Inductor's time, outputs match): {'met' if met else 'NOT met'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": info, "args": vars(a), "results": results, "targets_met": met}, f, indent=2)
    return 0 if all(r["match"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Compile time of a 2-layer small transformer (kiln.demo's TinyTransformer) on the CPU:
TorchInductor cold vs kiln cold vs kiln warm (on-disk cache), each in a fresh subprocess so no
in-memory state (Dynamo, Inductor's FX cache, numba's dispatchers, imported kernel modules)
carries over; prints kiln's per-pass timings.

    python bench/compile_time.py [--small] [--threads N] [--json PATH]

Cold means fresh cache directories: TORCHINDUCTOR_CACHE_DIR (and Triton's) in a new temp dir for
Inductor; for kiln a new KILN_CACHE_DIR and NUMBA_CACHE_DIR (so numba compiles kiln's helper
module too, not only the kernels). Warm re-runs kiln in a second fresh process on the same
cache dir. The time measured is compile + first call (what a user waits for), after the model is
built and after `import torch`, `torch._dynamo`, `torch._inductor` (the modules torch.compile
itself imports, whichever backend) and `kiln`, which are reported separately.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
mode, small = sys.argv[1], sys.argv[2] == "1"
import torch._dynamo, torch._inductor     # torch.compile's own modules, imported by both compilers
import kiln
from kiln import demo
t_import = time.perf_counter() - t0
model, inputs = demo.make(demo.SMALL if small else demo.FULL)
with torch.no_grad():
    expected = model(*inputs)
    t0 = time.perf_counter()
    if mode == "inductor":
        fn = torch.compile(model, backend="inductor", dynamic=False)
    else:
        fn = kiln.compile(model, target="cpu", cache_dir=os.environ["KILN_CACHE_DIR"])
    got = fn(*inputs)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn(*inputs)
    second_ms = (time.perf_counter() - t0) * 1e3
err = (got - expected).abs().max().item()
out = {"mode": mode, "compile_s": compile_s, "import_s": t_import, "second_call_ms": second_ms,
       "max_abs_err": err}
if mode != "inductor":
    rep = kiln.last_report().to_dict()
    out["passes"] = rep["passes"]
    out["kernels"] = sum(1 for k in rep["kernels"] if k["target"] == "cpu")
    out["report_compile_s"] = rep["compile_s"]
print("RESULT " + json.dumps(out))
"""


def run_child(mode: str, small: bool, env: dict) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, mode, "1" if small else "0"], env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        sys.stderr.write(p.stdout + p.stderr)
        raise SystemExit(f"{mode} child failed (exit {p.returncode})")
    res = json.loads(line[len("RESULT "):])
    res["process_wall_s"] = wall
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="the SMALL demo config (default: FULL)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the temp cache dirs")
    a = ap.parse_args(argv)

    root = tempfile.mkdtemp(prefix="kiln_compile_bench_")
    base = dict(os.environ, BENCH_THREADS=str(a.threads))
    ienv = dict(base, TORCHINDUCTOR_CACHE_DIR=os.path.join(root, "inductor"),
                TRITON_CACHE_DIR=os.path.join(root, "triton"))
    # numba's disk cache in the same fresh root: kernels and kiln's numba_math helpers start cold
    kenv = dict(base, KILN_CACHE_DIR=os.path.join(root, "kiln"), NUMBA_CACHE_DIR=os.path.join(root, "numba"))
    try:
        ind = run_child("inductor", a.small, ienv)
        cold = run_child("kiln_cold", a.small, kenv)
        warm = run_child("kiln_warm", a.small, kenv)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)

    from kiln import demo
    cfg = demo.SMALL if a.small else demo.FULL
    print(f"2-layer transformer ({'SMALL' if a.small else 'FULL'} demo config: d_model {cfg.d_model}, "
          f"heads {cfg.heads}, seq {cfg.seq}, batch {cfg.batch}, vocab {cfg.vocab}), CPU, "
          f"{a.threads} threads; compile + first call, fresh process each\n")
    print("| compiler | compile + first call (s) | imports (s) | max abs err vs eager |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in (("TorchInductor, cold", ind), ("kiln, cold", cold), ("kiln, warm (on-disk cache)", warm)):
        print(f"| {name} | {r['compile_s']:.2f} | {r['import_s']:.2f} | {r['max_abs_err']:.1g} |")
    print(f"\nkiln vs Inductor cold: {ind['compile_s'] / cold['compile_s']:.1f}x faster; "
          f"warm vs cold: {cold['compile_s'] / warm['compile_s']:.1f}x faster "
          f"({cold['kernels']} numba kernels)")
    for name, r in (("cold", cold), ("warm", warm)):
        passes = ", ".join(f"{p['name']} {p['ms']:.0f}ms" for p in r["passes"])
        print(f"kiln {name} per-pass (last compiled graph): {passes}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "inductor_cold": ind, "kiln_cold": cold, "kiln_warm": warm}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

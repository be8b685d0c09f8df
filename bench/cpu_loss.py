"""Cross-entropy training step on the CPU: eager vs TorchInductor vs kiln, one process, ratios.
The loss over fp32 logits (rows x classes) and its gradient, calls round-robin and back to back.

    python bench/cpu_loss.py [--rows 4096 --cols 2048 --runs 20 --json PATH]

Run under GLIBC_TUNABLES that keep freed blocks in the heap (see bench/cpu_fusion.py
--heap-reuse) to time compute rather than page faults: this script re-runs itself under them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_fusion import HEAP_REUSE  # noqa: E402


def loss_fn(x, t):
    return F.cross_entropy(x, t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if os.environ.get("GLIBC_TUNABLES") != HEAP_REUSE:
        env = dict(os.environ, GLIBC_TUNABLES=HEAP_REUSE)
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])],
                               env=env)
    import kiln
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(a.rows, a.cols, generator=g) * 4).requires_grad_()
    t = torch.randint(0, a.cols, (a.rows,), generator=g)
    impls = {"eager": loss_fn, "inductor": torch.compile(loss_fn), "kiln": kiln.compile(loss_fn, target="cpu")}
    grads = {}
    for name, f in impls.items():
        for _ in range(3):
            grads[name] = torch.autograd.grad(f(x, t), x)[0]
    ok = all(torch.allclose(grads[k], grads["eager"], rtol=1e-5, atol=1e-7) for k in impls)

    def ms(f) -> float:
        t0 = time.perf_counter()
        torch.autograd.grad(f(x, t), x)
        return (time.perf_counter() - t0) * 1e3
    ts = {k: [] for k in impls}
    for _ in range(a.runs):
        for name, f in impls.items():
            ts[name].append(ms(f))
    rr = {k: statistics.median(v) for k, v in ts.items()}
    # each one's calls back to back: after an ATen op PyTorch's OpenMP threads spin for a while,
    # and kiln's own threads (codegen/numba_runtime.py) share the cores with them
    blocked = {name: statistics.median([ms(f) for _ in range(a.runs)]) for name, f in impls.items()}
    print(f"cross-entropy forward + backward, fp32 {a.rows}x{a.cols}, {torch.get_num_threads()} threads, "
          f"medians of {a.runs} calls; gradients match eager: {'yes' if ok else 'NO'}")
    for label, m in (("round-robin", rr), ("back to back", blocked)):
        print(f"  {label}: eager {m['eager']:.2f} ms, Inductor {m['inductor']:.2f} ms, kiln {m['kiln']:.2f} ms; "
              f"kiln {m['eager'] / m['kiln']:.2f}x eager, {m['kiln'] / m['inductor']:.2f} of Inductor's time")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "round_robin_ms": rr, "back_to_back_ms": blocked, "match": ok}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

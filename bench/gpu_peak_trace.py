"""Allocator trace of one eager step and one kiln step of a model, as bench/gpu_memory.py measures
them: each step's peak above the memory held before it, and the blocks live at that peak with the
Python frames that allocated them (kiln's executor steps, the model's lines, autograd). Finds what
kiln holds that eager does not. ``mlp`` (default) is tests/gpu/test_gpu_memory.py's MLP; ``zoo:NAME``
the test zoo's models; gpt2 / llama / bert the memory benchmark's transformers (``--small`` for
their small configs). How the sixth session found run_list's locals holding an activation past
its free.

    PYTHONPATH=$PWD python bench/gpu_peak_trace.py [--case zoo:cnn] [--train] [--top 12]
"""
import argparse
import functools
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "gpu"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from gpu_memory import Logits, configs, step_of, warm_workspaces, zoo_cases  # noqa: E402
from kiln.api import kiln_backend  # noqa: E402

OPTIONS = {"target": "triton", "cudagraphs": False}
SKIP = ("/torch/", "/triton/", "gpu_peak_trace.py", "<frozen", "/contextlib.py", "/functools.py")


def case(name: str, small: bool):
    if name == "mlp":
        from test_gpu_memory import MLP
        return MLP, lambda: ([torch.randn(4096, 1024, device="cuda")], {})
    cases, models = zoo_cases(), configs(small)
    if name in cases:
        return cases[name]
    if name not in models:
        raise SystemExit(f"--case: unknown case {name!r}; choose mlp, {', '.join(sorted(cases))} or "
                         f"{', '.join(models)}")
    mk, ins = models[name]
    return mk, lambda: ((), ins())


def traced_peak(run, base: int, top: int) -> int:
    """Runs ``run()`` under the allocator's history; prints the blocks live at its peak."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    run()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live, cur, best = {}, 0, (0, {})
    for e in snap["device_traces"][0]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
        elif e["action"] == "free_requested" and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
        if cur > best[0]:
            best = (cur, dict(live))
    print(f"  peak {torch.cuda.max_memory_allocated() - base:,} B above the base ({best[0]:,} B of it "
          f"allocated during the step)")
    for e in sorted(best[1].values(), key=lambda e: -e["size"])[:top]:
        frames = [f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in e.get("frames", [])
                  if not any(s in f["filename"] for s in SKIP)][:4]
        print(f"  {e['size']:>12,} B  {' <- '.join(frames)}")
    return best[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="mlp", help="mlp, zoo:NAME, gpt2, llama or bert")
    ap.add_argument("--train", action="store_true", help="a training step (default: inference)")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    make_model, make_inputs = case(a.case, a.small)
    torch.manual_seed(0)
    model = Logits(make_model()).cuda().train(a.train)
    args, kw = make_inputs()
    if a.train:
        args = [x.requires_grad_(x.is_floating_point()) for x in args]

    step = functools.partial(step_of, model, args, kw, a.train)
    warm_workspaces()
    torch.cuda.synchronize()
    gc.collect()
    base = torch.cuda.memory_allocated()
    step(model)()
    print(f"eager ({a.case}, {'train step' if a.train else 'inference'}):")
    traced_peak(step(model), base, a.top)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=functools.partial(kiln_backend, options=OPTIONS))
    for _ in range(2):
        step(compiled)()
    print("kiln:")
    traced_peak(step(compiled), base, a.top)
    torch.cuda.synchronize()
    print(f"held after the steps above the base: {torch.cuda.memory_allocated() - base:,} B")


if __name__ == "__main__":
    main()

"""Allocator trace of one eager step and one kiln step of a model, as bench/gpu_memory.py measures
them: each step's peak above the memory held before it, and the blocks live at that peak with the
Python frames that allocated them (kiln's executor steps, the model's lines, autograd). Finds what
kiln holds that eager does not. ``mlp`` (default) is tests/gpu/test_gpu_memory.py's MLP; ``zoo:NAME``
the test zoo's models; gpt2 / llama / bert the memory benchmark's transformers (``--small`` for
their small configs). How the sixth session found run_list's locals holding an activation past
its free.

    PYTHONPATH=$PWD python bench/gpu_peak_trace.py [--case zoo:cnn] [--train] [--top 12] [--dtype bfloat16]
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


def label_blocks() -> dict[int, list]:
    """address -> [(bytes, "graph kind:value name"), ...] in order, for every tensor kiln's
    compiled graphs make from now on: each live CompiledGraph's kernel and ATen steps are wrapped
    to note their outputs' addresses (a fresh tensor's address is its allocator block's)."""
    from kiln.passes.memory import fresh_outputs
    from kiln.runtime import CompiledGraph, executor
    labels: dict[int, list] = {}
    for cg in [o for o in gc.get_objects() if type(o) is CompiledGraph]:
        kind = cg.graph.meta.get("graph_kind", "?")

        def note(names, res, kind=kind):
            for name, t in zip(names, res if isinstance(res, (list, tuple)) else [res]):
                if name is not None and isinstance(t, torch.Tensor) and t.device.type == "cuda":
                    st = t.untyped_storage()
                    labels.setdefault(st.data_ptr(), []).append((st.nbytes(), f"{kind}:{name}"))
        for k, (mode, what, args, extra, outs, frees) in enumerate(cg._steps):
            names = [o[0] for o in outs]
            if mode == executor.KERNEL:      # (outputs written over an input make no block)
                names = [n if n not in (extra or {}) else None for n in names]
                class Launch:
                    def __init__(self, inner, names, note):
                        self.inner, self.names, self.note = inner, names, note

                    def launch(self, a, res):
                        self.note(self.names, res)
                        return self.inner.launch(a, res)
                what = Launch(what, names, note)
            elif mode == executor.ATEN and fresh_outputs(what[0].op):     # (views make none)
                node, fn, cloning = what

                def call(*a, _fn=fn, _names=names, _note=note, **kw):
                    r = _fn(*a, **kw)
                    _note(_names, r)
                    return r
                what = (node, call, cloning)
            cg._steps[k] = (mode, what, args, extra, outs, frees)
    return labels


def traced_peak(run, base: int, top: int, labels: dict | None = None) -> int:
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
            notes = (labels or {}).get(e["addr"], [])    # the first note this block can hold
            k = next((i for i, (nb, _) in enumerate(notes) if nb <= e["size"]), None)
            if k is not None:
                e["label"] = notes.pop(k)[1]
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
        label = e.get("label", "")
        print(f"  {e['size']:>12,} B  {label + '  ' if label else ''}{' <- '.join(frames)}")
    return best[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="mlp", help="mlp, zoo:NAME, gpt2, llama or bert")
    ap.add_argument("--train", action="store_true", help="a training step (default: inference)")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    make_model, make_inputs = case(a.case, a.small)
    torch.manual_seed(0)
    model = Logits(make_model()).to("cuda", dtype).train(a.train)
    args, kw = make_inputs()
    args = [x.to(dtype) if x.is_floating_point() else x for x in args]
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
    labels = label_blocks()
    print("kiln (blocks named graph kind:value where kiln's steps made them):")
    traced_peak(step(compiled), base, a.top, labels)
    torch.cuda.synchronize()
    print(f"held after the steps above the base: {torch.cuda.memory_allocated() - base:,} B")


if __name__ == "__main__":
    main()

"""Allocator trace of one kiln call of tests/gpu/test_gpu_memory.py's MLP (inference): which tensors are live
at the call's peak and where they were allocated, the executor's steps and frees, and its kept views.
How the sixth session found run_list's locals holding an activation past its free.

    PYTHONPATH=$PWD python bench/gpu_peak_trace.py
"""
import functools, sys, os, torch, collections
sys.path.insert(0, "tests/gpu"); sys.path.insert(0, "bench")
from test_gpu_memory import MLP, OPTIONS
from gpu_memory import peak, warm_workspaces
from kiln.api import kiln_backend
import kiln
torch.manual_seed(0)
model = MLP().cuda().eval()
x = torch.randn(4096, 1024, device="cuda")
warm_workspaces(); torch.cuda.synchronize()
base = torch.cuda.memory_allocated()
def run(f):
    with torch.no_grad(): f(x)
run(model); print("eager", peak(lambda: run(model), base))
torch._dynamo.reset()
c = torch.compile(model, backend=functools.partial(kiln_backend, options=OPTIONS))
run(c); run(c); print("kiln", peak(lambda: run(c), base))
rep = kiln.last_report(); print("report memory", rep.memory)
for k in rep.kernels: print("  ", k["name"], k["target"])
torch.cuda.memory._record_memory_history(max_entries=100000, stacks="python")
run(c); torch.cuda.synchronize()
snap = torch.cuda.memory._snapshot()
torch.cuda.memory._record_memory_history(enabled=None)
ev = snap["device_traces"][0]
live = {}; cur = 0; best = (0, None)
for i, e in enumerate(ev):
    if e["action"] == "alloc":
        live[e["addr"]] = e; cur += e["size"]
    elif e["action"] in ("free_requested",):
        if e["addr"] in live: cur -= live.pop(e["addr"])["size"]
    if cur > best[0]: best = (cur, dict(live))
print("trace peak over the call", best[0] / 2**20, "MiB")
for a, e in best[1].items():
    fr = [f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in e.get("frames", []) if "/work/" in f["filename"] or "kiln" in f["filename"]][:4]
    print(f"  {e['size']/2**20:.1f} MiB", fr)
import gc, weakref
from kiln.runtime import CompiledGraph
torch.cuda.synchronize()
print("allocated above base after calls", (torch.cuda.memory_allocated() - base) / 2**20, "MiB")
params = {id(p) for p in model.parameters()}
for cg in [o for o in gc.get_objects() if not isinstance(o, weakref.ProxyType) and type(o) is CompiledGraph]:
    print("graph: arena", cg.plan.arena_bytes / 2**20, "MiB; transient", cg.transient_arena,
          "steps", [s[0] for s in cg._steps].count("view"), "views of", len(cg._steps))
    arena = {id(v) for vs in cg._views.values() for v in vs.values()}
    for k, s in enumerate(cg._steps):
        kept = getattr(cg, "_kept", [None] * len(cg._steps))[k]
        if s[0] == "view" or kept is not None:
            src = "none" if kept is None else ("param" if id(kept[0]) in params else "arena" if id(kept[0]) in arena else "OTHER")
            print(f"  step {k} {s[1]} of {s[2]} kept={kept is not None} src={src}",
                  None if kept is None else (tuple(kept[0].shape), kept[0].untyped_storage().nbytes() / 2**20))
    for k, s in enumerate(cg._steps):
        print("   ", k, s[0], getattr(s[1], "__name__", "") if s[0] != "kernel" else "", [o[0] for o in s[4]], "frees", s[5])

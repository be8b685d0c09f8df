"""Host time of one kiln call, piece by piece (tiny softmax, so GPU time is negligible): eager, Dynamo alone,
Inductor, kiln.compile, the AOT wrapper, kiln's CompiledGraph, one kernel launch, allocation; then cProfile
of a kiln call and of the executor. Runs on the CPU too (target cpu).

    PYTHONPATH=$PWD python bench/gpu_host_breakdown.py
"""
import sys, gc, weakref, functools, cProfile, pstats, io
import torch, kiln
from kiln.api import kiln_backend
from kiln.options import Options
from kiln.runtime import CompiledGraph
from host_timer import best_us
dev = "cuda" if torch.cuda.is_available() else "cpu"
tgt = "triton" if dev == "cuda" else "cpu"
def us(f, n=3000):
    return best_us(f, n, warmup=100)
x = torch.randn(16, 16, device=dev)
fn = lambda x: torch.softmax(x, -1)
cap = {}
def be(gm, ex):
    c = kiln_backend(gm, ex, options=Options.make(None, target=tgt, cudagraphs=False))
    cap["c"] = c
    return c
k = kiln.compile(fn, target=tgt, cudagraphs=False)
k2 = torch.compile(fn, backend=be)
i = torch.compile(fn)
i2 = torch.compile(fn, dynamic=False)
ie = torch.compile(fn, backend="eager")
res = {}
with torch.no_grad():
    k(x); k2(x); i(x); i2(x); ie(x)
    for n, f in [("eager", lambda: fn(x)), ("dynamo backend=eager", lambda: ie(x)), ("inductor", lambda: i(x)),
                 ("inductor dynamic=False", lambda: i2(x)), ("kiln.compile", lambda: k(x)),
                 ("kiln backend no dynamic=False", lambda: k2(x))]:
        res[n] = us(f)
    c = cap["c"]
    res["backend callable (AOT wrapper)"] = us(lambda: c(x))
    cg = [o for o in gc.get_objects() if not isinstance(o, weakref.ProxyType) and type(o) is CompiledGraph][-1]
    res["CompiledGraph.run_list"] = us(lambda: cg.run_list([x]))
    kern = list(cg.kernels.values())[0]
    out = torch.empty(16, 16, device=dev)
    res["kernel.launch"] = us(lambda: kern.launch([x], [out]))
    res["torch.empty"] = us(lambda: torch.empty(16, 16, device=dev))
    res["torch.empty_strided"] = us(lambda: torch.empty_strided((16, 16), (16, 1), device=dev))
    from kiln.runtime.host_alloc import empty_strided
    res["host_alloc.empty_strided"] = us(lambda: empty_strided((16, 16), (16, 1), dtype=torch.float32, device=torch.device(dev)))
    if dev == "cuda":
        res["torch.cuda.current_stream"] = us(lambda: torch.cuda.current_stream().cuda_stream)
    for n, t in res.items():
        print(f"{n:40s} {t:7.1f} us")
    for name, f in (("kiln.compile", lambda: k(x)), ("run_list", lambda: cg.run_list([x]))):
        pr = cProfile.Profile(); pr.enable()
        for _ in range(2000): f()
        pr.disable(); s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22); print(name, s.getvalue()[-6000:])

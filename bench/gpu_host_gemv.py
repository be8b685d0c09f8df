"""GEMV 1x4096 . 4096->11008 bf16: host time per call (back-to-back), time_gpu, do_bench; eager, Inductor,
kiln (as bench/matmul.py compiles it) with cudagraphs auto/off/on; cProfile of kiln's calls.

    python bench/gpu_host_gemv.py
"""
import cProfile, pstats, io, torch, kiln
from triton.testing import do_bench
from host_timer import issue_us
from kiln.autotune.measure import time_gpu
F = torch.nn.functional
dev = "cuda"
def gemv(x, w): return F.linear(x, w)
def host_us(f): return issue_us(f, 200)
x = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)
w = torch.randn(11008, 4096, device=dev, dtype=torch.bfloat16) / 64
with torch.no_grad():
    fs = {"eager": lambda: gemv(x, w)}
    torch._dynamo.reset(); ind = torch.compile(gemv); fs["inductor"] = lambda: ind(x, w)
    for cg in ("auto", False, True):
        torch._dynamo.reset()
        km = kiln.compile(gemv, (x, w), target="triton", cudagraphs=cg)
        fs[f"kiln cudagraphs={cg}"] = (lambda km=km: km(x, w))
        print(type(km), flush=True)
    for f in fs.values():
        for _ in range(30): f()
    for n, f in fs.items():
        print(f"{n:24s} host {host_us(f):7.1f} us/call  time_gpu {time_gpu(f)*1e3:6.1f} us  do_bench {do_bench(f, warmup=25, rep=100, return_mode='median')*1e3:6.1f} us", flush=True)
    from kiln.runtime.cudagraphs import live_runners
    print([r.describe() for r in live_runners()])
    for n in ("kiln cudagraphs=auto", "kiln cudagraphs=False"):
        pr = cProfile.Profile(); pr.enable()
        for _ in range(500): fs[n]()
        pr.disable(); torch.cuda.synchronize()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18); print(n); print(s.getvalue()[-4500:])

"""Where a short kiln call spends its time (softmax 4096x8192 bf16): do_bench time, the host's time to
issue a call, back-to-back calls, the CUDA graph decision and the kernels' GPU time from a CUDA
profile, with replay "auto", off and always.

    PYTHONPATH=$PWD python bench/gpu_call_time.py
"""
import os, sys, tempfile, torch
os.environ.setdefault("KILN_CACHE_DIR", tempfile.mkdtemp())
sys.path.insert(0, "bench")
import kiln, gpu_fusion as gf
from kiln.runtime.cudagraphs import live_runners
from triton.testing import do_bench
x = torch.randn(4096, 8192, device="cuda", dtype=torch.bfloat16)
for opts in ({}, {"cudagraphs": False}, {"cudagraphs": True}):
    torch._dynamo.reset()
    kl = kiln.compile(gf.softmax, target="triton", **opts)
    for _ in range(5): kl(x)
    torch.cuda.synchronize()
    t = do_bench(lambda: kl(x), warmup=25, rep=200, return_mode="median")
    rs = [r for r in live_runners()]
    desc = [r.describe() + f" samples={[(round(a,4), round(b,4)) for a, b in r.samples]}" for r in rs][-1:] if rs else ["no runner"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
        for _ in range(10): kl(x)
        torch.cuda.synchronize()
    ev = [e for e in p.key_averages() if e.device_type.name == "CUDA"]
    kt = ", ".join(f"{e.key[:40]} {e.device_time / 1e3:.4f} ms x{e.count}" for e in ev)
    import time
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(100): kl(x)
    host = (time.perf_counter() - t0) * 10
    torch.cuda.synchronize(); loop = (time.perf_counter() - t0) * 10
    print(f"{opts}: do_bench {t:.4f} ms; host issue {host:.4f} ms/call, back-to-back {loop:.4f} ms/call; {desc}; kernels: {kt}", flush=True)

"""Host time per call of a softmax, tiny (16x16 fp32) and large (4096x8192 bf16): eager, Inductor,
kiln without CUDA-graph replay and with the "auto" policy (back-to-back calls, best of 7 x 40),
their do_bench times, and a cProfile of kiln's call on the large input.

    python bench/gpu_host_sizes.py
"""
import cProfile, pstats, io, torch, kiln
from triton.testing import do_bench
from host_timer import issue_us
dev = "cuda"
fn = lambda x: torch.softmax(x, -1)
def host_us(f): return issue_us(f, 40)
for shape, dt in (((16, 16), torch.float32), ((4096, 8192), torch.bfloat16)):
    x = torch.randn(shape, device=dev, dtype=dt)
    torch._dynamo.reset()
    ind = torch.compile(fn)
    k0 = kiln.compile(fn, target="triton", cudagraphs=False)
    k1 = kiln.compile(fn, target="triton")
    with torch.no_grad():
        for f in (ind, k0, k1):
            for _ in range(30): f(x)
        res = {n: host_us(f) for n, f in (("eager", lambda: fn(x)), ("inductor", lambda: ind(x)),
                                          ("kiln graphs off", lambda: k0(x)), ("kiln auto", lambda: k1(x)))}
        empt = host_us(lambda: torch.empty_like(x))
        bench = {n: do_bench(f, warmup=25, rep=100, return_mode="median") * 1e3 for n, f in
                 (("inductor", lambda: ind(x)), ("kiln graphs off", lambda: k0(x)), ("kiln auto", lambda: k1(x)))}
    print(shape, dt, " ".join(f"{n}: {v:.1f} us" for n, v in res.items()), f"| empty_like {empt:.1f} us", "| do_bench us:",
          " ".join(f"{n} {v:.1f}" for n, v in bench.items()), flush=True)
    if shape[0] > 16:
        with torch.no_grad():
            for name, f in (("graphs off", lambda: k0(x)),):
                pr = cProfile.Profile(); pr.enable()
                for _ in range(300): f()
                pr.disable(); torch.cuda.synchronize()
                s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25); print(name, s.getvalue()[-7000:])

"""Why bias+GELU+residual (16384x4096 bf16) stopped short of the copy roofline on an H200: the same
hand-written kernel with four forms of GELU's erf, over five launch configs, kernel alone (do_bench).
V0 tl.erf (libdevice, what kiln generated before), V1 Eigen's rational erf with a fast division,
V2 no erf at all (the memory ceiling of this access pattern; wrong results), V3 the exp2-polynomial
erfc that codegen/triton_gen.py's ``_erfc`` now uses (its first fit, clamped at 4).

    python bench/gpu_gelu_erf.py
"""
import torch, triton, triton.language as tl
from triton.testing import do_bench
dev = "cuda"; bf = torch.bfloat16
def bench(f): return do_bench(f, warmup=25, rep=200, return_mode="median")
a = torch.empty(1 << 30, dtype=torch.uint8, device=dev); b2 = torch.empty_like(a)
BW = 2 * a.numel() / (bench(lambda: b2.copy_(a)) * 1e-3); del a, b2
print(f"copy bw {BW/1e9:.0f} GB/s")
M, N = 16384, 4096
x = torch.randn(M, N, device=dev, dtype=bf); r = torch.randn_like(x); v = torch.randn(N, device=dev, dtype=bf)
o = torch.empty_like(x)
ref = torch.nn.functional.gelu(x + v) + r
nbytes = 3 * M * N * 2

@triton.jit
def erf_eigen(x):
    x = tl.minimum(tl.maximum(x, -4.0), 4.0)
    x2 = x * x
    p = x2 * -2.72614225801306e-10 + 2.77068142495902e-08
    p = p * x2 + -2.10102402082508e-06
    p = p * x2 + -5.69250639462346e-05
    p = p * x2 + -7.34990630326855e-04
    p = p * x2 + -2.95459980854025e-03
    p = p * x2 + -1.60960333262415e-02
    p = p * x
    q = x2 * -1.45660718464996e-05 + -2.13374055278905e-04
    q = q * x2 + -1.68282697438203e-03
    q = q * x2 + -7.37332916720468e-03
    q = q * x2 + -1.42647390514189e-02
    return tl.fdiv(p, q, ieee_rounding=False)

@triton.jit
def gelu_exp2(t):
    z = tl.minimum(tl.abs(t * 0.7071067811865476), 4.0)
    p = z * 1.430370616617438e-06 + -2.6785393856698647e-05
    p = p * z + 0.00018794197239913046
    p = p * z + -0.0003821765712928027
    p = p * z + -0.0031328804325312376
    p = p * z + 0.03099696896970272
    p = p * z + -0.15021033585071564
    p = p * z + -0.9178803563117981
    p = p * z + -1.62797212600708
    h = 0.5 * tl.math.exp2(p * z)
    return t * tl.where(t < 0, h, 1.0 - h)

@triton.jit
def k(in0, in1, in2, out, XBLOCK: tl.constexpr, V: tl.constexpr):
    x = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)
    x1 = x % 4096
    a = tl.load(in0 + x).to(tl.float32); b = tl.load(in1 + x1).to(tl.float32); s = tl.load(in2 + x).to(tl.float32)
    t = a + b
    if V == 0:
        g = t * 0.5 * (tl.erf(t * 0.7071067811865476) + 1.0)
    elif V == 1:
        g = t * 0.5 * (erf_eigen(t * 0.7071067811865476) + 1.0)
    elif V == 2:
        g = t * 0.5 * (t + 1.0)
    else:
        g = gelu_exp2(t)
    y = g.to(tl.bfloat16).to(tl.float32) + s
    tl.store(out + x, y.to(tl.bfloat16))

print("torch x + r", f"{nbytes/BW/(bench(lambda: torch.add(x, r, out=o))*1e-3):.1%}")
for V, name in ((0, "tl.erf"), (1, "eigen rational"), (2, "no erf (ceiling)"), (3, "exp2 poly")):
    for XB, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 4)):
        f = lambda: k[(M * N // XB,)](x, v, r, o, XB, V, num_warps=w)
        f(); torch.cuda.synchronize()
        err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
        t = bench(f)
        print(f"  V{V} {name:18s} XB{XB:5d} w{w}: {t*1e3:7.1f} us {nbytes/BW/(t*1e-3):6.1%} roof  err {err:.2e}", flush=True)

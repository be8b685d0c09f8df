"""Ceiling study for bench/gpu_fusion.py's cases: how close hand-written Triton kernels (1-D and
2-D tiles, persistent grid-stride loops, eviction hints, masked or not) and torch's own copy and
add get to the copy roofline on this GPU, and how copy bandwidth falls with size. Prints one line
per variant; kiln's generated kernels are measured by gpu_fusion.py.

    python bench/gpu_ceiling.py
"""
import torch, triton, triton.language as tl, itertools, sys, json
from triton.testing import do_bench
dev = "cuda"; bf = torch.bfloat16
def bench(f): return do_bench(f, warmup=20, rep=100, return_mode="median")
nsm = torch.cuda.get_device_properties(0).multi_processor_count
a = torch.empty(1 << 30, dtype=torch.uint8, device=dev); b = torch.empty_like(a)
BW = 2 * a.numel() / (bench(lambda: b.copy_(a)) * 1e-3); del a, b
print(f"SMs {nsm}; copy bw 1GiB {BW/1e9:.0f} GB/s")
for mb in (64, 128, 201, 256, 512):
    a = torch.empty(mb << 20, dtype=torch.uint8, device=dev); b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a)); print(f"  torch copy {mb} MiB: {2*a.numel()/t/1e6:.0f} GB/s = {2*a.numel()/t/1e6/(BW/1e9):.1%} of 1GiB copy")
    del a, b
M, N = 16384, 4096
x = torch.randn(M, N, device=dev, dtype=bf); r = torch.randn_like(x); v = torch.randn(N, device=dev, dtype=bf)
o = torch.empty_like(x)
def rep(name, nbytes, f, ref=None, out=None):
    try:
        f(); torch.cuda.synchronize()
        t = bench(f)
        err = "" if ref is None else f" err {((out.float()-ref.float()).norm()/ref.float().norm()).item():.1e}"
        print(f"  {name:60s} {t*1e3:8.1f} us  {nbytes/(BW)/(t*1e-3):6.1%} roof{err}", flush=True)
        return t
    except Exception as e:
        print(f"  {name:60s} FAILED {type(e).__name__}: {str(e)[:150]}", flush=True)
print("== 3-stream pointwise (2 reads + 1 write of 128 MiB)")
rep("torch x + r", 3*x.numel()*2, lambda: torch.add(x, r, out=o))
ref = torch.nn.functional.gelu(x + v) + r

@triton.jit
def _gelu_res(p, q, s):
    """gelu(p + q) rounded to bf16, plus s: the case's arithmetic, in fp32 like kiln and eager."""
    t = p + q
    return (t * 0.5 * (tl.erf(t * 0.7071067811865476) + 1.0)).to(tl.bfloat16).to(tl.float32) + s

@triton.jit
def bgr_kiln(in0, in1, in2, out, XN, NC: tl.constexpr, XBLOCK: tl.constexpr, MASK: tl.constexpr, EV: tl.constexpr, FLAT: tl.constexpr):
    x = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)
    xmask = x < XN
    x0 = x // NC; x1 = x % NC
    a = x if FLAT else x0 * NC + x1
    if MASK:
        p = tl.load(in0 + a, mask=xmask, other=0, eviction_policy=EV).to(tl.float32)
        q = tl.load(in1 + x1, mask=xmask, other=0, eviction_policy="evict_last").to(tl.float32)
        s = tl.load(in2 + a, mask=xmask, other=0, eviction_policy=EV).to(tl.float32)
    else:
        p = tl.load(in0 + a, eviction_policy=EV).to(tl.float32)
        q = tl.load(in1 + x1, eviction_policy="evict_last").to(tl.float32)
        s = tl.load(in2 + a, eviction_policy=EV).to(tl.float32)
    y = _gelu_res(p, q, s)
    if MASK:
        tl.store(out + a, y.to(tl.bfloat16), mask=xmask, eviction_policy=EV)
    else:
        tl.store(out + a, y.to(tl.bfloat16), eviction_policy=EV)

@triton.jit
def bgr_persist(in0, in1, in2, out, NT, NC: tl.constexpr, XBLOCK: tl.constexpr, EV: tl.constexpr, STAGES: tl.constexpr):
    for tile in tl.range(tl.program_id(0), NT, tl.num_programs(0), num_stages=STAGES):
        x = tile * XBLOCK + tl.arange(0, XBLOCK)
        x1 = x % NC
        p = tl.load(in0 + x, eviction_policy=EV).to(tl.float32)
        q = tl.load(in1 + x1, eviction_policy="evict_last").to(tl.float32)
        s = tl.load(in2 + x, eviction_policy=EV).to(tl.float32)
        y = _gelu_res(p, q, s)
        tl.store(out + x, y.to(tl.bfloat16), eviction_policy=EV)

@triton.jit
def bgr_2d(in0, in1, in2, out, NC: tl.constexpr, RB: tl.constexpr, CB: tl.constexpr, EV: tl.constexpr):
    rows = tl.program_id(0) * RB + tl.arange(0, RB)[:, None]
    cols = tl.program_id(1) * CB + tl.arange(0, CB)[None, :]
    a = rows * NC + cols
    p = tl.load(in0 + a, eviction_policy=EV).to(tl.float32)
    q = tl.load(in1 + cols, eviction_policy="evict_last").to(tl.float32)
    s = tl.load(in2 + a, eviction_policy=EV).to(tl.float32)
    y = _gelu_res(p, q, s)
    tl.store(out + a, y.to(tl.bfloat16), eviction_policy=EV)

nb = 3 * x.numel() * 2; XN = x.numel()
for XB, w, mask, ev, flat in itertools.product((1024, 2048, 4096, 8192), (4, 8, 16), (True, False), ("", "evict_first"), (False, True)):
    if XB < 32 * w * 4: continue
    if (not mask or ev) and not flat and XB != 2048: continue
    rep(f"1d XB{XB} w{w} mask{int(mask)} ev={ev or '-'} flat{int(flat)}", nb,
        lambda: bgr_kiln[(triton.cdiv(XN, XB),)](x, v, r, o, XN, N, XB, mask, ev, flat, num_warps=w), ref, o)
for XB, w, k, ev, st in itertools.product((2048, 4096), (4, 8), (2, 4, 8), ("", "evict_first"), (1, 2)):
    if XB < 32 * w * 4: continue
    NT = XN // XB
    rep(f"persist XB{XB} w{w} grid {k}xSM ev={ev or '-'} st{st}", nb,
        lambda: bgr_persist[(min(NT, k * nsm),)](x, v, r, o, NT, N, XB, ev, st, num_warps=w), ref, o)
for RB, CB, w, ev in itertools.product((1, 2, 4, 8), (512, 1024, 2048, 4096), (4, 8), ("", "evict_first")):
    if RB * CB < 1024 or RB * CB > 8192: continue
    rep(f"2d RB{RB} CB{CB} w{w} ev={ev or '-'}", nb,
        lambda: bgr_2d[(M // RB, N // CB)](x, v, r, o, N, RB, CB, ev, num_warps=w), ref, o)

print("== softmax 4096x8192 (read + write 64 MiB)")
s_in = torch.randn(4096, 8192, device=dev, dtype=bf); s_out = torch.empty_like(s_in)
sref = torch.softmax(s_in, -1)
rep("torch copy same bytes", 2 * s_in.numel() * 2, lambda: s_out.copy_(s_in))
@triton.jit
def sm_row(inp, out, NR, NC: tl.constexpr, XB: tl.constexpr, EV: tl.constexpr, EXP2: tl.constexpr):
    rows = tl.program_id(0) * XB + tl.arange(0, XB)[:, None]
    cols = tl.arange(0, NC)[None, :]
    v = tl.load(inp + rows * NC + cols, eviction_policy=EV).to(tl.float32)
    m = tl.max(v, 1)[:, None]
    if EXP2:
        e = tl.math.exp2((v - m) * 1.4426950408889634)
    else:
        e = tl.exp(v - m)
    ssum = tl.sum(e, 1)[:, None]
    tl.store(out + rows * NC + cols, (e / ssum).to(tl.bfloat16), eviction_policy=EV)
@triton.jit
def sm_persist(inp, out, NR, NC: tl.constexpr, EV: tl.constexpr, STAGES: tl.constexpr):
    cols = tl.arange(0, NC)
    for row in tl.range(tl.program_id(0), NR, tl.num_programs(0), num_stages=STAGES):
        v = tl.load(inp + row * NC + cols, eviction_policy=EV).to(tl.float32)
        m = tl.max(v, 0)
        e = tl.exp(v - m)
        tl.store(out + row * NC + cols, (e / tl.sum(e, 0)).to(tl.bfloat16), eviction_policy=EV)
nbs = 2 * s_in.numel() * 2
for XB, w, ev, e2 in itertools.product((1, 2), (4, 8, 16, 32), ("", "evict_first"), (False, True)):
    rep(f"row XB{XB} w{w} ev={ev or '-'} exp2{int(e2)}", nbs, lambda: sm_row[(4096 // XB,)](s_in, s_out, 4096, 8192, XB, ev, e2, num_warps=w), sref, s_out)
for w, k, ev, st in itertools.product((8, 16), (1, 2, 4), ("", "evict_first"), (1, 2)):
    rep(f"persist w{w} grid {k}xSM ev={ev or '-'} st{st}", nbs, lambda: sm_persist[(k * nsm,)](s_in, s_out, 4096, 8192, ev, st, num_warps=w), sref, s_out)

print("== layernorm 16384x4096 (read + write 128 MiB)")
lw = torch.randn(N, device=dev, dtype=bf); lb = torch.randn(N, device=dev, dtype=bf)
lref = torch.nn.functional.layer_norm(x, (N,), lw, lb, 1e-5)
@triton.jit
def ln_row(inp, w, b, out, NC: tl.constexpr, XB: tl.constexpr, EV: tl.constexpr):
    rows = tl.program_id(0) * XB + tl.arange(0, XB)[:, None]
    cols = tl.arange(0, NC)[None, :]
    v = tl.load(inp + rows * NC + cols, eviction_policy=EV).to(tl.float32)
    mean = tl.sum(v, 1)[:, None] / NC
    d = v - mean
    rstd = tl.rsqrt(tl.sum(d * d, 1)[:, None] / NC + 1e-5)
    y = d * rstd * tl.load(w + cols, eviction_policy="evict_last").to(tl.float32) + tl.load(b + cols, eviction_policy="evict_last").to(tl.float32)
    tl.store(out + rows * NC + cols, y.to(tl.bfloat16), eviction_policy=EV)
@triton.jit
def ln_persist(inp, w, b, out, NR, NC: tl.constexpr, EV: tl.constexpr, STAGES: tl.constexpr):
    cols = tl.arange(0, NC)
    wv = tl.load(w + cols).to(tl.float32); bv = tl.load(b + cols).to(tl.float32)
    for row in tl.range(tl.program_id(0), NR, tl.num_programs(0), num_stages=STAGES):
        v = tl.load(inp + row * NC + cols, eviction_policy=EV).to(tl.float32)
        mean = tl.sum(v, 0) / NC
        d = v - mean
        rstd = tl.rsqrt(tl.sum(d * d, 0) / NC + 1e-5)
        tl.store(out + row * NC + cols, (d * rstd * wv + bv).to(tl.bfloat16), eviction_policy=EV)
nbl = 2 * x.numel() * 2
rep("torch copy same bytes", nbl, lambda: o.copy_(x))
for XB, w, ev in itertools.product((1, 2, 4), (4, 8, 16), ("", "evict_first")):
    rep(f"row XB{XB} w{w} ev={ev or '-'}", nbl, lambda: ln_row[(M // XB,)](x, lw, lb, o, N, XB, ev, num_warps=w), lref, o)
for w, k, ev, st in itertools.product((4, 8, 16), (2, 4, 8), ("", "evict_first"), (1, 2)):
    rep(f"persist w{w} grid {k}xSM ev={ev or '-'} st{st}", nbl, lambda: ln_persist[(k * nsm,)](x, lw, lb, o, M, N, ev, st, num_warps=w), lref, o)

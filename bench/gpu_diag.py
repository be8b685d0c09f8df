"""GPU diagnostics behind bench/RESULTS.md's H200 notes, one process:

- sweep: every launch config (XBLOCK, warps, stages) of the micro cases' generated kernels, timed
  through the compiled graph, against the copy roofline; plus a CUDA profile of the default;
- profile: CUDA kernel tables (torch.profiler) of kiln and Inductor on the GPT-2, BERT and Llama
  model cases, which separate GPU time from host time;
- memory: a training step's forward peak, held bytes and backward peak, eager vs kiln (the
  MLP of tests/gpu/test_gpu_memory.py, GPT-2 and BERT at bench/gpu_memory.py's configs).

    PYTHONPATH=$PWD python bench/gpu_diag.py [sweep] [profile] [memory]
"""
import functools
import gc
import json
import os
import sys
import tempfile
import traceback

os.environ.setdefault("KILN_CACHE_DIR", tempfile.mkdtemp(prefix="kiln-diag-"))
_here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _here)
sys.path.insert(0, os.path.join(os.path.dirname(_here), "tests", "gpu"))
import torch
from triton.testing import do_bench
import kiln
from kiln.aot import compile_ahead
import cases as C
SECTIONS = ("sweep", "profile", "memory")
what = sys.argv[1:] or list(SECTIONS)
if set(what) - set(SECTIONS):
    sys.exit(f"gpu_diag.py: unknown section(s) {sorted(set(what) - set(SECTIONS))}; choose from {', '.join(SECTIONS)}")
dev = "cuda"

class Wrap(torch.nn.Module):
    def __init__(s, fn): super().__init__(); s.fn = fn
    def forward(s, *a): return s.fn(*a)

def bench(f): return do_bench(f, warmup=25, rep=200, return_mode="median")

def sweep():
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev); b = torch.empty_like(a)
    bw = 2 * a.numel() / (bench(lambda: b.copy_(a)) * 1e-3); del a, b
    print(f"copy bw {bw/1e9:.0f} GB/s")
    for name in ["softmax", "layernorm", "bias_gelu_residual", "add_rmsnorm"]:
        torch.manual_seed(0)
        fn, inputs = C.CASES[name][1](dev, False)
        ref = fn(*inputs)
        outs = ref if isinstance(ref, tuple) else (ref,)
        nbytes = sum(t.numel() * t.element_size() for t in (*inputs, *outs))
        roof = nbytes / bw * 1e3
        compiled, _ = compile_ahead(Wrap(fn), inputs, {"target": "triton"})
        ks = [k for k in compiled.kernels.values() if k.target == "triton"]
        print(f"== {name}: {len(ks)} kernels, roofline {roof:.4f} ms; default cfg", [k.meta.get("config") for k in ks])
        t = bench(lambda: compiled(*inputs)); print(f"  kiln call {t:.4f} ms ({roof/t:.0%})")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
            for _ in range(5): compiled(*inputs)
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=6, max_name_column_width=60))
        k = ks[0]
        rn = k.meta["rnumel"]
        if k.kind == "pointwise":
            grid = [{"XBLOCK": xb, "RBLOCK": 1, "num_warps": w} for xb in (512, 1024, 2048, 4096, 8192) for w in (2, 4, 8, 16) if xb >= 32 * w]
        else:
            rb = 1 << (rn - 1).bit_length()
            grid = [{"XBLOCK": xb, "RBLOCK": rb, "num_warps": w, **({"num_stages": s} if s else {})}
                    for xb in (1, 2, 4) for w in (2, 4, 8, 16, 32) for s in (0, 1)]
        res = []
        for cfg in grid:
            k.meta["config"] = cfg; k.launcher = None
            try:
                compiled(*inputs); torch.cuda.synchronize()
                res.append((bench(lambda: compiled(*inputs)), cfg))
            except Exception as e:
                print("  cfg", cfg, "failed", type(e).__name__, str(e)[:100])
        res.sort(key=lambda r: r[0])
        for t, cfg in res[:6]:
            print(f"  {t:.4f} ms ({roof/t:.0%}) {cfg}")
        print(f"  worst {res[-1][0]:.4f} {res[-1][1]}")
        if name == "softmax":
            src = k.source.replace("tl.reduce(tl.where(xmask & rmask, t0.to(tl.float32), (-float('inf'))), 1, _max_nan)", "tl.max(tl.where(xmask & rmask, t0.to(tl.float32), (-float('inf'))), 1)")
            print("  tl.max variant differs:", src != k.source)
            k.source = src; k.meta["config"] = res[0][1]; k.launcher = None
            compiled(*inputs); torch.cuda.synchronize()
            t = bench(lambda: compiled(*inputs)); print(f"  tl.max variant {t:.4f} ms ({roof/t:.0%})")
        del compiled; gc.collect(); torch.cuda.empty_cache()

def profile():
    for name in ["gpt2_block", "bert_layer", "llama_layer"]:
        torch.manual_seed(0)
        fn, inputs = C.CASES[name][1](dev, False)
        for backend in ("inductor", "kiln"):
            torch._dynamo.reset()
            with torch.no_grad():
                f = torch.compile(fn, dynamic=False) if backend == "inductor" else kiln.compile(fn, target="triton")
                f(*inputs); f(*inputs); torch.cuda.synchronize()
                t = bench(lambda: f(*inputs))
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
                    for _ in range(5): f(*inputs)
                    torch.cuda.synchronize()
            print(f"== {name} {backend}: {t:.4f} ms per call (CUDA totals over 5 calls)")
            print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
            if backend == "kiln":
                r = kiln.last_report()
                print("  kernels:", [(k["name"], k["target"]) for k in r.kernels])
        del fn, inputs; gc.collect(); torch.cuda.empty_cache()

def memory():
    """Per phase of one training step: the MLP of tests/gpu/test_gpu_memory.py, then the
    transformers configs of bench/gpu_memory.py (GPT-2, BERT)."""
    from test_gpu_memory import MLP
    from gpu_memory import Logits, configs, warm_workspaces
    from kiln.api import kiln_backend
    warm_workspaces()
    torch.manual_seed(0)
    x = torch.randn(4096, 1024, device="cuda", requires_grad=True)
    cases = [("mlp", MLP().cuda().train(True), (x,), {})]
    for name in ("gpt2", "bert"):
        mk, ins = configs(False)[name]
        torch.manual_seed(0)
        cases.append((name, Logits(mk()).cuda().train(True), (), ins()))
    for name, model, args, kw in cases:
        def stats(f, label):
            for p in model.parameters(): p.grad = None
            torch.cuda.synchronize(); gc.collect(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
            y = f(*args, **kw).float(); torch.cuda.synchronize()
            fwd_peak, after_fwd = torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base
            torch.cuda.reset_peak_memory_stats(); y.sum().backward(); torch.cuda.synchronize()
            bwd_peak = torch.cuda.max_memory_allocated() - base
            print(f"{name} {label}: fwd peak {fwd_peak/2**20:.1f} MiB, held after fwd {after_fwd/2**20:.1f} MiB, "
                  f"bwd peak (rel. base) {bwd_peak/2**20:.1f} MiB")
        stats(model, "eager"); stats(model, "eager")
        opts = {"target": "triton", "cudagraphs": False, "report": os.path.join(tempfile.mkdtemp(), "r.jsonl")}
        torch._dynamo.reset()
        c = torch.compile(model, backend=functools.partial(kiln_backend, options=opts))
        stats(c, "kiln"); stats(c, "kiln")
        for line in open(opts["report"]):
            r = json.loads(line); print("  report", r.get("graph_kind", r.get("kind")), r["memory"])
        del c, model; torch._dynamo.reset(); gc.collect(); torch.cuda.empty_cache()

for sec in what:
    try:
        globals()[sec]()
    except Exception:
        traceback.print_exc()

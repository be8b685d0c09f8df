"""GPU matmul benchmarks: kiln's Triton matmul templates vs eager vs TorchInductor vs the roofline,
all measured in one process (bf16).

Cases: GEMV (decode) 1x4096 . 4096->11008 (memory bound: roofline = bytes / copy bandwidth);
SwiGLU MLP 8192x4096->11008->4096 (compute bound: roofline = flops / the bf16 peak measured as an
8192^3 torch.mm in this run); Llama decoder layer (TinyLlama shapes: hidden 2048, 32 heads,
4 KV heads, MLP 5632; B8 S1024). Times are medians with a cold L2 (kiln.autotune.measure).

    python bench/matmul.py [--cases gemv,mlp,layer] [--tune] [--sweep] [--json out.json]

--tune also compiles with autotune=True (each matmul timed against cuBLAS and its config space);
--sweep times a list of launch configs of each kiln matmul kernel alone and checks each against
the cuBLAS path of the same kernel (that is how the default heuristics were chosen).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

os.environ.setdefault("KILN_CACHE_DIR", tempfile.mkdtemp(prefix="kiln-bench-"))
import kiln  # noqa: E402
from kiln.autotune.measure import time_gpu  # noqa: E402

F = torch.nn.functional
BF = torch.bfloat16


class SwiGLU(torch.nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate = torch.nn.Linear(d, f, bias=False)
        self.up = torch.nn.Linear(d, f, bias=False)
        self.down = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Gemv(torch.nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.proj = torch.nn.Linear(d, f, bias=False)

    def forward(self, x):
        return self.proj(x)


def llama_layer():
    import transformers as T
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    cfg = T.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                        max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rot = LlamaRotaryEmbedding(cfg)
            self.layer = LlamaDecoderLayer(cfg, 0)

        def forward(self, h):
            pos = torch.arange(h.shape[1], device=h.device)[None]
            return self.layer(h, position_ids=pos, position_embeddings=self.rot(h, pos))
    return Layer()


def gemv(x, w):
    return F.linear(x, w)


def linear_gelu(x, w, b):
    return F.gelu(F.linear(x, w, b), approximate="tanh")


def cases(names, dev):
    """(name, fn, inputs, work, rotate): ``rotate`` lists extra input tuples with fresh weights, so
    device-time replays cycle through more bytes than L2 holds."""
    out = []
    if "gemv" in names:
        x = torch.randn(1, 4096, device=dev, dtype=BF)
        ws = [torch.randn(11008, 4096, device=dev, dtype=BF) / 64 for _ in range(4)]
        out.append(("GEMV 1x4096 . 4096->11008", gemv, (x, ws[0]), {"bytes": 2 * (4096 * 11008 + 4096 + 11008)},
                    [(x, w) for w in ws]))
    if "mlp" in names:
        m = SwiGLU(4096, 11008).to(dev, BF).eval()
        x = torch.randn(8192, 4096, device=dev, dtype=BF)
        out.append(("SwiGLU MLP 8192x4096->11008", m, (x,), {"flops": 2 * 8192 * 4096 * 11008 * 3}, None))
    if "mid" in names:
        x = torch.randn(2048, 2048, device=dev, dtype=BF)
        w, b = torch.randn(8192, 2048, device=dev, dtype=BF) / 45, torch.randn(8192, device=dev, dtype=BF)
        out.append(("Linear+GELU 2048x2048->8192", linear_gelu, (x, w, b), {"flops": 2 * 2048 * 2048 * 8192}, None))
    if "layer" in names:
        m = llama_layer().to(dev, BF).eval()
        x = torch.randn(8, 1024, 2048, device=dev, dtype=BF)
        fl = 2 * 8192 * 2048 * (2048 + 512 + 2048 + 3 * 5632) + 2 * 8 * 32 * 1024 * 1024 * 64 * 2
        out.append(("Llama layer B8 S1024 h2048", m, (x,), {"flops": fl}, None))
    return out


def graph_ms(fn, input_sets, reps: int = 20) -> float:
    """Device time per call: ``reps`` rounds over ``input_sets`` captured in one CUDA graph and
    replayed (no host overhead, no L2 flush writing back dirty lines; rotating inputs keep the
    weights cold)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for args in input_sets:
            fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for args in input_sets:
                fn(*args)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / (reps * len(input_sets)))
    return sorted(times)[2]


def copy_bandwidth(dev) -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return 2 * a.numel() / (time_gpu(lambda: b.copy_(a)) * 1e-3)


def peak_flops(dev) -> float:
    a = torch.randn(8192, 8192, device=dev, dtype=BF)
    b = torch.randn(8192, 8192, device=dev, dtype=BF)
    return 2 * 8192 ** 3 / (time_gpu(lambda: a @ b, rep_ms=200) * 1e-3)


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def kiln_kernels(rep) -> list[str]:
    return [f"{k['name']}:{k['target']}" for k in rep.kernels if k["kind"] == "matmul"]


def sweep_configs(meta) -> list[dict]:
    base = {"GROUP_M": 8, "SPLIT_K": 1, "GEMV": 0, "ATEN": 0}
    cfgs = [{**base, "ATEN": 1, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4}]
    if meta["M"] <= 16:
        bm = max(1, 1 << (meta["M"] - 1).bit_length())
        for bn, bk, w in [(4, 512, 4), (8, 256, 4), (8, 512, 4), (16, 256, 4), (16, 512, 4), (32, 256, 4),
                          (16, 512, 8), (32, 512, 8), (8, 1024, 4), (16, 1024, 8), (64, 128, 4), (32, 128, 2),
                          (16, 256, 2), (8, 512, 2), (32, 256, 2), (8, 256, 2), (16, 128, 2), (16, 128, 1)]:
            for df, pf in [(0, 0), (1, 0), (0, 1), (1, 1)]:
                if bm * bn * bk * (1 + df) <= 16384 * w // 4 * 2:
                    cfgs.append({**base, "GEMV": 1, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1,
                                 "DEFER": df, "PREFETCH": pf, "num_warps": w, "num_stages": 1})
        for bn, bk, w, st, sk in [(128, 128, 4, 4, 1), (128, 128, 4, 5, 1), (64, 128, 4, 6, 1), (128, 64, 4, 6, 1),
                                  (256, 64, 4, 4, 1), (128, 128, 8, 4, 1), (64, 256, 4, 4, 1), (128, 128, 4, 4, 2)]:
            cfgs.append({**base, "BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": w,
                         "num_stages": st})
    else:
        for bm, bn, bk, w, st, gm in [(128, 128, 64, 8, 3, 8), (128, 128, 64, 8, 4, 8), (128, 256, 64, 8, 3, 8),
                                      (128, 256, 64, 8, 4, 8), (256, 128, 64, 8, 3, 8), (128, 128, 64, 4, 4, 8),
                                      (128, 128, 32, 8, 6, 8), (128, 128, 64, 8, 4, 16), (128, 64, 64, 4, 4, 8),
                                      (64, 128, 64, 4, 4, 8)]:
            if meta["segments"][0]["P"] > 1 and bn > 128:
                continue
            cfgs.append({**base, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "num_warps": w,
                         "num_stages": st})
    return cfgs


def spearman(a, b) -> float:
    rank = lambda xs: {i: r for r, i in enumerate(sorted(range(len(xs)), key=xs.__getitem__))}  # noqa: E731
    ra, rb = rank(a), rank(b)
    n = len(a)
    return 1 - 6 * sum((ra[i] - rb[i]) ** 2 for i in range(n)) / (n * (n * n - 1)) if n > 2 else float("nan")


def sweep(compiled, dev, log, record):
    """Device time (CUDA-graph replays over 3 fresh input sets) of configs of each matmul kernel
    alone; each config's outputs are checked against the kernel's cuBLAS path. Each config is also
    timed as the tuner times it (time_gpu: L2 evicted by a read) and by do_bench (L2 evicted by
    zeroing a buffer), and the rank correlation of each with the device time is printed."""
    from triton.testing import do_bench
    from kiln.codegen.tuning import _sample
    for n in compiled.graph.nodes:
        if n.op != "kiln.matmul":
            continue
        k = compiled.kernels[n.outputs[0].name]
        sets = [[_sample(v.type, dev) * 0.1 if v.type.dtype.is_floating_point else _sample(v.type, dev)
                 for v in n.args] for _ in range(3)]
        outs = [torch.empty_strided(v.type.shape, v.type.strides, dtype=v.type.dtype, device=dev) for v in n.outputs]
        ref, rows = None, []
        for cfg in sweep_configs(k.meta):
            k.meta["config"] = cfg
            k.launcher = None
            try:
                k.launch(sets[0], outs)
                torch.cuda.synchronize()
                err = 0.0 if ref is None else max(rel_err(o, r) for o, r in zip(outs, ref))
                if ref is None:
                    ref = [o.clone() for o in outs]
                ms = graph_ms(lambda *a: k.launch(list(a), outs), sets)
                tuner_ms = time_gpu(lambda: k.launch(sets[0], outs))
                zero_ms = do_bench(lambda: k.launch(sets[0], outs), warmup=10, rep=40, return_mode="median")
            except Exception as e:  # noqa: BLE001
                log(f"    {k.name} {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}")
                continue
            rows.append({"kernel": k.name, "config": cfg, "device_ms": ms, "time_gpu_ms": tuner_ms,
                         "do_bench_ms": zero_ms, "rel_err_vs_cublas": err})
            log(f"    {k.name} {json.dumps(cfg)}: {ms:.4f} ms (time_gpu {tuner_ms:.4f}, do_bench {zero_ms:.4f})  "
                f"rel_err_vs_cublas={err:.1e}")
        dev_ms = [r["device_ms"] for r in rows]
        log(f"    {k.name}: rank correlation with device time: time_gpu "
            f"{spearman([r['time_gpu_ms'] for r in rows], dev_ms):.3f}, do_bench "
            f"{spearman([r['do_bench_ms'] for r in rows], dev_ms):.3f} ({len(rows)} configs)")
        record.extend(rows)
        k.meta.pop("config", None)
        k.launcher = None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="gemv,mlp,layer")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--sweep", default="", help="comma-separated words of case names to sweep, e.g. gemv,linear")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/matmul.py needs a CUDA GPU")
    dev = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "cases": []}
    import triton
    out["triton"] = triton.__version__
    bw, peak = copy_bandwidth(dev), peak_flops(dev)
    out.update(copy_bandwidth=bw, peak_flops=peak)
    print(f"{out['device']}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, bf16 8192^3 mm {peak / 1e12:.0f} TFLOP/s", flush=True)
    for name, m, inputs, work, rotate in cases(args.cases.split(","), dev):
        roof = work["bytes"] / bw * 1e3 if "bytes" in work else work["flops"] / peak * 1e3
        row = {"case": name, "roofline_ms": roof}
        labels = []

        def measure(label, fn):
            row[f"{label}_ms"] = time_gpu(lambda: fn(*inputs))
            row[f"{label}_err"] = rel_err(fn(*inputs), ref)          # after many (direct) launches
            if rotate:
                row[f"{label}_device_ms"] = graph_ms(fn, rotate)
            labels.append(label)
        with torch.no_grad():
            ref = m(*inputs)
            measure("eager", m)
            torch._dynamo.reset()
            measure("inductor", torch.compile(m))
            for label, opts in [("kiln", {})] + ([("kiln_tuned", {"autotune": True})] if args.tune else []):
                torch._dynamo.reset()
                try:
                    km = kiln.compile(m, inputs, target="triton", **opts)
                    rep = kiln.last_report()
                    measure(label, km)
                except Exception as e:  # noqa: BLE001 - report and go on with the other cases
                    row[f"{label}_failed"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"  {label} FAILED: {row[f'{label}_failed']}", flush=True)
                    continue
                row[f"{label}_kernels"] = kiln_kernels(rep)
                row[f"{label}_tuning_s"] = rep.tuning_s
        out["cases"].append(row)
        if args.json:                   # after every case, so a cut-off run keeps what it measured
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        pct = lambda ms: 100 * roof / ms  # noqa: E731
        print(f"\n{name}: roofline {roof:.4f} ms")
        for label in labels:
            dev_ms = row.get(f"{label}_device_ms")
            extra = f"  device {dev_ms:.4f} ms ({pct(dev_ms):5.1f}%)" if dev_ms else ""
            print(f"  {label:10s} {row[f'{label}_ms']:.4f} ms  {pct(row[f'{label}_ms']):5.1f}% of roofline{extra}  "
                  f"err {row.get(f'{label}_err', 0):.1e}  {row.get(f'{label}_kernels', '')}", flush=True)
        if any(k in name.lower() for k in args.sweep.split(",") if k):
            from kiln.aot import compile_ahead
            compiled, _ = compile_ahead(m, inputs, {"target": "triton"})
            sweep(compiled, dev, lambda s: print(s, flush=True), out.setdefault("sweeps", []))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

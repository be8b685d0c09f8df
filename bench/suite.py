"""The benchmark suite: micro and model cases on eager, TorchInductor and kiln in one process.

For every case: median time of each (L2 flushed before every run on the GPU), kiln's and
Inductor's relative error against eager, first-call (compile) time, and the case's roofline:
max(bytes / copy bandwidth, FLOPs / matmul peak), both measured in the same run (bytes = inputs,
weights and outputs moved once; FLOPs counted by torch's FlopCounterMode on the eager run).
Geometric-mean speed-ups over eager per group. Writes JSON, a markdown table and (bench/chart.py)
a bar chart.

    python bench/suite.py [--cases model] [--json out.json] [--markdown out.md] [--chart out.png] [--autotune]
    kiln bench ...            (the same, through the CLI)
    kiln bench --cpu          (small CPU cases: kiln's numba target vs Inductor's C++)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("KILN_CACHE_DIR", tempfile.mkdtemp(prefix="kiln-bench-"))
import cases as C  # noqa: E402

import kiln  # noqa: E402
from kiln.autotune.measure import time_cpu, time_gpu  # noqa: E402
from kiln.runtime.cudagraphs import live_runners  # noqa: E402

BACKENDS = ("eager", "inductor", "kiln")


class BenchError(ValueError):
    """A bad request (no GPU for GPU cases, unknown case): one line on the CLI."""


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _bytes(fn, inputs, outputs) -> int:
    """Unique storages read or written once: inputs, parameters and buffers, outputs."""
    ts = _tensors(inputs) + _tensors(outputs)
    if isinstance(fn, torch.nn.Module):
        ts += list(fn.parameters()) + list(fn.buffers())
    seen, n = set(), 0
    for t in ts:
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            n += t.numel() * t.element_size()
    return n


def _sdpa_flops(q, k, v, *args, **kwargs) -> int:
    """Attention forward: Q K^T and P V. Counts query heads, so grouped-query attention (fewer
    key/value heads, which torch's own formula rejects) is counted right."""
    *batch, s_q, d = q
    n = 1
    for b in batch:
        n *= b
    return 2 * n * s_q * k[-2] * d + 2 * n * s_q * k[-2] * v[-1]


def _flops(fn, inputs) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    aten = torch.ops.aten
    sdpa = {op: _sdpa_flops for op in (aten._scaled_dot_product_flash_attention,
                                       aten._scaled_dot_product_efficient_attention,
                                       aten._scaled_dot_product_cudnn_attention,
                                       aten._scaled_dot_product_flash_attention_for_cpu)}
    with FlopCounterMode(display=False, custom_mapping=sdpa) as fc:
        fn(*inputs)
    return int(fc.get_total_flops())


def rel_err(got, want) -> float:
    g, w = _tensors(got), _tensors(want)
    if len(g) != len(w):
        return math.inf
    errs = [float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)) for a, b in zip(g, w)]
    return max(errs, default=0.0)


def copy_bandwidth(dev: str) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = (1 << 30) if dev == "cuda" else (1 << 26)
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = _timer(dev)(lambda: b.copy_(a))
    return 2 * n / (ms * 1e-3)


def matmul_peak(dev: str) -> float:
    """FLOP/s of a large square matmul (bf16 on the GPU, fp32 on the CPU)."""
    n, dt = (8192, torch.bfloat16) if dev == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)
    ms = _timer(dev)(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3)


def _timer(dev: str):
    return time_gpu if dev == "cuda" else (lambda f: time_cpu(f, warmup=2, reps=10, min_s=0.2))


def _kiln_stats(report_path: str) -> dict:
    """Totals over every graph kiln compiled for the case (graph breaks make several)."""
    reps = []
    if os.path.exists(report_path):
        with open(report_path) as f:
            reps = [json.loads(line) for line in f if line.strip()]
    fallbacks = sorted({op for r in reps for op in r["fallback_ops"]})
    return {"graphs": len(reps), "kernels": sum(1 for r in reps for k in r["kernels"] if k["target"] != "aten"),
            "aten_calls": sum(1 for r in reps for k in r["kernels"] if k["target"] == "aten"),
            "fallback_ops": fallbacks, "tuning_s": sum(r.get("tuning_s", 0.0) for r in reps)}


def run_case(name: str, dev: str, small: bool, autotune: bool, tol: float) -> dict:
    group, factory, desc = C.CASES[name]
    torch.manual_seed(0)
    fn, inputs = factory(dev, small)
    timer = _timer(dev)
    row = {"case": name, "group": group, "desc": desc if not small else f"{name} (small, CPU)"}
    with torch.no_grad():
        ref = fn(*inputs)
        row["bytes"] = _bytes(fn, inputs, ref)
        try:
            row["flops"] = _flops(fn, inputs)
        except Exception as e:          # noqa: BLE001 - the roofline then counts bytes only
            row["flops"], row["flops_error"] = 0, f"{type(e).__name__}: {e}"[:300]
        row["eager_ms"] = timer(lambda: fn(*inputs))
        for backend in ("inductor", "kiln"):
            torch._dynamo.reset()
            try:
                before = {id(r) for r in live_runners()}
                rpath = os.path.join(tempfile.mkdtemp(prefix="kiln-bench-report-"), "r.jsonl")
                if backend == "inductor":
                    compiled = torch.compile(fn, dynamic=False)
                else:
                    compiled = kiln.compile(fn, target="triton" if dev == "cuda" else "cpu", autotune=autotune,
                                            report=rpath)
                t0 = time.perf_counter()
                out = compiled(*inputs)
                if dev == "cuda":
                    torch.cuda.synchronize()
                row[f"{backend}_first_call_s"] = time.perf_counter() - t0
                row[f"{backend}_rel_err"] = rel_err(out, ref)
                row[f"{backend}_ms"] = timer(lambda: compiled(*inputs))
                if backend == "kiln":
                    row["kiln"] = _kiln_stats(rpath)
                    if dev == "cuda":           # whether the timed calls replayed a CUDA graph
                        row["kiln"]["cudagraphs"] = [r.describe() for r in live_runners() if id(r) not in before]
                    row["kiln_ok"] = row["kiln_rel_err"] <= tol
            except Exception as e:      # noqa: BLE001 - one failing case must not end the suite
                lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
                # Dynamo wraps backend errors: the line naming the inner error says what went wrong
                inner = next((ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", ln)), None)
                row[f"{backend}_error"] = inner[:300] if inner else f"{type(e).__name__}: {(lines or [''])[0][:300]}"
                row[f"{backend}_error_detail"] = "\n".join(lines)[-3000:]
                print(f"  {name}: {backend} failed: {row[f'{backend}_error']}", file=sys.stderr, flush=True)
    torch._dynamo.reset()
    return row


def add_rooflines(rows: list[dict], bw: float, peak: float) -> None:
    for r in rows:
        t_mem, t_flop = r["bytes"] / bw, r["flops"] / peak
        r["roofline_ms"] = max(t_mem, t_flop) * 1e3
        r["bound"] = "compute" if t_flop > t_mem else "memory"
        for b in BACKENDS:
            if f"{b}_ms" in r:
                r[f"{b}_roofline_frac"] = r["roofline_ms"] / r[f"{b}_ms"]


def geomeans(rows: list[dict]) -> dict:
    """Per group: geometric-mean speed-up over eager of Inductor and kiln, over the cases that
    both ran (a kiln failure or wrong result counts as no speed-up: 1.0)."""
    out = {}
    for group in sorted({r["group"] for r in rows}):
        rs = [r for r in rows if r["group"] == group and "inductor_ms" in r]
        if not rs:
            continue
        g = {}
        for b in ("inductor", "kiln"):
            sp = [r["eager_ms"] / r[f"{b}_ms"] if f"{b}_ms" in r and r.get(f"{b}_ok", True) else 1.0 for r in rs]
            g[b] = math.exp(sum(map(math.log, sp)) / len(sp))
        g["cases"] = len(rs)
        out[group] = g
    return out


def meta(dev: str, bw: float, peak: float, command: str, autotune: bool) -> dict:
    import triton
    m = {"device": torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({os.cpu_count()} cores)",
         "torch": torch.__version__, "triton": triton.__version__, "kiln": kiln.__version__,
         "copy_bandwidth_GBps": bw / 1e9, "matmul_peak_TFLOPs": peak / 1e12,
         "matmul_dtype": "bf16" if dev == "cuda" else "fp32", "kiln_autotune": autotune,
         "command": command}
    try:
        import transformers
        m["transformers"] = transformers.__version__
    except ImportError:
        pass
    return m


def markdown(result: dict) -> str:
    m, rows = result["meta"], result["rows"]
    tuned = m.get("kiln_autotune")
    lines = [f"Device: {m['device']}; torch {m['torch']}, Triton {m['triton']}, "
             f"transformers {m.get('transformers', '-')}, kiln {m['kiln']}; kiln autotune: {m['kiln_autotune']}.",
             f"Measured in the same run: copy bandwidth {m['copy_bandwidth_GBps']:.0f} GB/s (read + write), "
             f"{m['matmul_dtype']} matmul peak {m['matmul_peak_TFLOPs']:.3g} TFLOP/s.",
             f"Command: `{m['command']}`", "",
             "| case | eager ms | Inductor ms | kiln ms | roofline ms (bound) | Inductor % roof | kiln % roof "
             "| kiln vs Inductor | kiln rel err | kiln kernels / ATen calls |" + (" kiln tuning s |" if tuned else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if tuned else "")]
    f = lambda r, k, fmt: format(r[k], fmt) if k in r else "failed"  # noqa: E731
    for r in rows:
        vs = f"{r['inductor_ms'] / r['kiln_ms']:.2f}x" if "inductor_ms" in r and "kiln_ms" in r else "-"
        ks = r.get("kiln", {})
        lines.append(f"| {r['desc']} | {f(r, 'eager_ms', '.4f')} | {f(r, 'inductor_ms', '.4f')} | "
                     f"{f(r, 'kiln_ms', '.4f')} | {r['roofline_ms']:.4f} ({r['bound']}) | "
                     f"{f(r, 'inductor_roofline_frac', '.0%')} | {f(r, 'kiln_roofline_frac', '.0%')} | {vs} | "
                     f"{f(r, 'kiln_rel_err', '.1e')}{'' if r.get('kiln_ok', True) else ' (WRONG)'} | "
                     f"{ks.get('kernels', '-')} / {ks.get('aten_calls', '-')} |"
                     + (f" {ks['tuning_s']:.1f} |" if tuned and "tuning_s" in ks else " - |" if tuned else ""))
    lines.append("")
    for group, g in result["geomean"].items():
        lines.append(f"Geometric-mean speed-up over eager, {group} cases ({g['cases']}): "
                     f"Inductor {g['inductor']:.2f}x, kiln {g['kiln']:.2f}x.")
    errs = [f"{r['case']}: {b} {r[b + '_error']}" for r in rows for b in ("inductor", "kiln") if b + "_error" in r]
    if errs:
        lines += ["", "Failures:"] + [f"- {e}" for e in errs]
    return "\n".join(lines) + "\n"


def run(case_names=None, cpu: bool = False, autotune: bool = False, json_path=None, markdown_path=None,
        chart_path=None, command: str = "kiln bench", tol: float | None = None, log=print) -> dict:
    dev = "cpu" if cpu else "cuda"
    if not cpu and not torch.cuda.is_available():
        raise BenchError("kiln bench: the GPU cases need a CUDA GPU and none is available; "
                         "use --cpu for the small CPU cases")
    names = C.resolve(case_names, "tiny" if cpu else "all")
    tol = tol if tol is not None else (1e-4 if cpu else 3e-2)
    bw, peak = copy_bandwidth(dev), matmul_peak(dev)
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s, matmul peak {peak / 1e12:.3g} TFLOP/s")
    rows = []
    for name in names:
        r = run_case(name, dev, cpu, autotune, tol)
        rows.append(r)
        log(f"{name}: " + ", ".join(f"{b} {r[b + '_ms']:.4f} ms" for b in BACKENDS if b + "_ms" in r)
            + (f", kiln rel err {r['kiln_rel_err']:.1e}" if "kiln_rel_err" in r else ""))
        if dev == "cuda":
            torch.cuda.empty_cache()
        add_rooflines(rows, bw, peak)
        result = {"meta": meta(dev, bw, peak, command, autotune), "rows": rows, "geomean": geomeans(rows)}
        md = markdown(result)
        if json_path:                   # after every case, so an interrupted run keeps what it measured
            _write(json_path, json.dumps(result, indent=1))
        if markdown_path:
            _write(markdown_path, md)
    log(md)
    if chart_path:
        from chart import render
        render(result, chart_path)
    return result


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    """``python bench/suite.py ARGS`` is ``kiln bench ARGS`` (one argument parser, in kiln/cli.py)."""
    from kiln.cli import main as kiln_main
    return kiln_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

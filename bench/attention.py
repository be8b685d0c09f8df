"""Attention on the GPU: eager vs TorchInductor vs kiln in one process (median of
triton.testing.do_bench), at the issue's shapes (B4 H32 S2048 D128 bf16, causal).

Cases: naive causal attention (matmul, scale, masked_fill with a tril, fp32 softmax, matmul)
and SDPA (is_causal=True; eager runs PyTorch's flash kernel), inference; the same two as a
training step (forward + backward). kiln runs three ways (BACKENDS): its default, its own Triton
forward only, and tuned. ``--sweep`` also times every launch config of kiln's
forward and backward kernels on the naive case's shapes and prints the table.

    PYTHONPATH=$PWD python bench/attention.py [--json out.json] [--sweep] [--no-train]
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

os.environ.setdefault("KILN_CACHE_DIR", tempfile.mkdtemp(prefix="kiln-bench-"))
import kiln  # noqa: E402
from kiln.codegen import attention_config  # noqa: E402
from triton.testing import do_bench  # noqa: E402


# kiln: the default (the forward runs ATen's flash kernel where it applies: codegen/attention_aten.py);
# kiln_triton: kiln's own Triton forward; kiln_tuned: autotune=True (ATen's kernels and kiln's timed)
BACKENDS = ("eager", "inductor", "kiln", "kiln_triton", "kiln_tuned")


def naive(q, k, v):
    s = q.shape[-2]
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    att = att.masked_fill(~torch.tril(torch.ones(s, s, dtype=torch.bool, device=q.device)), float("-inf"))
    return torch.softmax(att.float(), dim=-1).to(q.dtype) @ v


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _train(fn, q, k, v, dout):
    def step():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)
    return step


def run_cases(shape, train: bool) -> list[dict]:
    b, h, s, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    dout = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
    flops = 4 * b * h * s * s * d / 2                    # causal: half the score matrix
    rows = []
    for name, fn in (("naive causal attention", naive), ("SDPA causal", sdpa)):
        for mode in ("inference", "training") if train else ("inference",):
            row = {"case": name, "mode": mode, "shape": list(shape)}
            ref = fn(q, k, v).float()
            for backend in BACKENDS:
                torch._dynamo.reset()
                attention_config.ATEN_DEFAULT = backend != "kiln_triton"
                f = fn if backend == "eager" else torch.compile(fn) if backend == "inductor" else \
                    kiln.compile(fn, target="triton", autotune=backend == "kiln_tuned")
                try:
                    if mode == "inference":
                        with torch.no_grad():
                            out = f(q, k, v)
                            row[f"{backend}_err"] = (out.float() - ref).abs().max().item()
                            row[f"{backend}_ms"] = _ms(lambda: f(q, k, v))
                    else:
                        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                        _train(f, qg, kg, vg, dout)()
                        row[f"{backend}_ms"] = _ms(_train(f, qg, kg, vg, dout))
                    if backend.startswith("kiln"):
                        row[f"{backend}_kernels"] = [(x["kind"], x["target"]) for x in kiln.last_report().kernels]
                except Exception as e:      # noqa: BLE001 - a failed backend is a result too
                    row[f"{backend}_ms"] = None
                    row[f"{backend}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            mult = 3.5 if mode == "training" else 1.0
            attention_config.ATEN_DEFAULT = True
            for backend in BACKENDS:
                if row.get(f"{backend}_ms"):
                    row[f"{backend}_tflops"] = flops * mult / row[f"{backend}_ms"] / 1e9
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def sweep(shape, kinds=("forward", "backward")) -> list[dict]:
    """Every launch config of the forward and backward kernels on the naive case's shapes."""
    from kiln.codegen.attention import build, load
    from kiln.ir import Node, Value
    from kiln.ir.types import TensorType
    from kiln.passes.attention import _attrs, _view
    b, h, s, d = shape
    q, k, v, o, do = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(5))
    lse = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
    vals = {n: Value(n, TensorType.of(t)) for n, t in (("q", q), ("k", k), ("v", v), ("o", o), ("do", do), ("lse", lse))}
    rows = []
    for kind in kinds:
        ins = ["q", "k", "v"] if kind == "forward" else ["do", "q", "k", "v", "o", "lse"]
        attrs = _attrs(kind, 1 / math.sqrt(d), True, 0, None, -math.inf, [_view(vals[n].type) for n in ins],
                       torch.bfloat16, torch.bfloat16, f"sweep_{kind}")
        node = Node("kiln.attention" if kind == "forward" else "kiln.attention_bwd",
                    tuple(vals[n] for n in ins), {}, [], attrs)
        kern = build(node, "triton", os.environ["KILN_CACHE_DIR"])
        tensors = dict(q=q, k=k, v=v, o=o, do=do, lse=lse)
        outs = [o, lse] if kind == "forward" else [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]
        if kind == "backward":         # the backward needs the forward's out and lse
            fk = build(Node("kiln.attention", (vals["q"], vals["k"], vals["v"]), {}, [],
                            _attrs("forward", 1 / math.sqrt(d), True, 0, None, -math.inf,
                                   [_view(vals[n].type) for n in "qkv"], torch.bfloat16, torch.bfloat16, "f")),
                       "triton", os.environ["KILN_CACHE_DIR"])
            fk.launch([q, k, v], [o, lse])
        grid = itertools.product((64, 128), (64, 128), (4, 8), (2, 3), (0, 1), (0, 1)) if kind == "forward" else \
            [(bm, bn, w, st, 0, 0) for (bm, bn), w, st in itertools.product(
                ((32, 64), (64, 64), (64, 128), (128, 64), (32, 128)), (4, 8), (1, 2, 3))]
        flops = 4 * b * h * s * s * d / 2 * (1 if kind == "forward" else 2.5)
        for bm, bn, w, st, tma, ws in grid:
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st, "TMA": tma, "WS": ws}
            kern.meta["config"] = cfg
            kern.launcher = None
            load(kern)
            try:
                ms = _ms(lambda: kern.launch([tensors[n] for n in ins], outs))
            except Exception as e:      # noqa: BLE001 - out of resources etc.
                ms, cfg["error"] = None, type(e).__name__
            row = {"kernel": kind, **cfg, "ms": ms, "tflops": flops / ms / 1e9 if ms else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=4, default=[4, 32, 2048, 128], metavar=("B", "H", "S", "D"))
    p.add_argument("--json", help="write the results here")
    p.add_argument("--sweep", nargs="*", choices=("forward", "backward"),
                   help="time every launch config of kiln's kernels (default: both)")
    p.add_argument("--no-cases", action="store_true", help="skip the eager/Inductor/kiln cases")
    p.add_argument("--no-train", action="store_true", help="inference cases only")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/attention.py needs a CUDA GPU", file=sys.stderr)
        return 1
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__,
           "cases": [] if a.no_cases else run_cases(tuple(a.shape), not a.no_train)}
    if a.sweep is not None:
        res["sweep"] = sweep(tuple(a.shape), tuple(a.sweep) or ("forward", "backward"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

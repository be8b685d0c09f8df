"""Generated Triton kernels compile for sm_90 without a GPU (Triton lowers to PTX on the CPU),
and whole blocks compile to unpredicated 16-byte loads: the bounds masks fold away when the
sizes divide the block; a ragged block keeps them."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_cuda_sources import _groups

from kiln.codegen.lower import lower
from kiln.codegen.triton_gen import render

F = torch.nn.functional

# compiles each kernel in a fresh interpreter: the test session may run Triton interpreted
_PTX = textwrap.dedent('''
    import importlib.util, json, os, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    out = []
    for k in json.load(sys.stdin):
        p = os.path.join(tempfile.mkdtemp(), "k.py")
        open(p, "w").write(k["source"])
        spec = importlib.util.spec_from_file_location("k", p)
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        fn = getattr(m, k["entry"])
        ptrs = [a for a in fn.arg_names if "ptr" in a]
        types = k.get("types", {})             # pointer dtypes; bf16 where a job names none
        sig = {a: (types.get(a, "*bf16") if a in ptrs else "constexpr") for a in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(ptrs))}
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=k["constexprs"], attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": k["num_warps"]}).asm["ptx"]
        loads = [l.strip() for l in ptx.splitlines() if "ld.global" in l]
        out.append({"loads": len(loads), "predicated": sum(l.startswith("@") for l in loads),
                    "vector": sum(".v4." in l for l in loads),
                    **{op: sum(op in l for l in ptx.splitlines()) for op in
                       ("div.full.f32", "div.rn.f32", "sqrt.approx", "sqrt.rn.f32", "rcp.approx.ftz.f32")}})
    print(json.dumps(out))
''')


def _ptx(jobs):
    r = subprocess.run([sys.executable, "-c", _PTX], input=json.dumps(jobs), capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    if r.returncode != 0 and "ptxas" in r.stderr.lower() and "not found" in r.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


_PTR = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16", torch.float16: "*fp16",
        torch.uint8: "*u8", torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1"}


def _model_jobs(model, *args) -> list[dict]:
    """One compile job per fused group of ``model``: its rendered source, pointer dtypes and blocks
    (64 rows a program without a reduction, one row of 256 with one)."""
    jobs = []
    for n in _groups(model, *args):
        lk = lower(n)
        src, _ = render(lk)
        types = {f"in_ptr{a.arg}": _PTR[a.dtype] for a in lk.loads}
        types.update({f"out_ptr{a.arg}": _PTR[a.dtype] for a in lk.stores})
        red = lk.rnumel > 1
        jobs.append({"source": src, "entry": lk.name, "types": types, "num_warps": 4,
                     "constexprs": {"XN": lk.xnumel, "RN": max(lk.rnumel, 1), "XBLOCK": 1 if red else 64,
                                    "RBLOCK": 256 if red else 1}})
    return jobs


def test_whole_blocks_compile_to_unpredicated_vector_loads():
    bf = torch.bfloat16

    def model(x, b, r, w):
        return F.gelu(x + b) + r, F.layer_norm(x, (256,), w, b)
    args = (torch.randn(64, 256, dtype=bf), torch.randn(256, dtype=bf), torch.randn(64, 256, dtype=bf),
            torch.randn(256, dtype=bf))
    lks = [lower(n) for n in _groups(model, *args)]
    assert {lk.kind for lk in lks} == {"pointwise", "reduction"}
    jobs = []
    for lk in lks:
        src, _ = render(lk)
        pw = lk.kind == "pointwise"
        whole = {"XN": 64 * 256, "RN": 1, "XBLOCK": 1024, "RBLOCK": 1} if pw else \
                {"XN": 64, "RN": 256, "XBLOCK": 1, "RBLOCK": 256}
        # a ragged last block (XN or RN not a multiple of its block) keeps its masks
        ragged = {**whole, "XN": 64 * 256 - 8} if pw else {**whole, "RBLOCK": 512}
        # 8 bf16 elements per thread, so a thread's slice is one 16-byte load
        warps = 4 if pw else 1
        jobs += [{"source": src, "entry": lk.name, "constexprs": c, "num_warps": warps} for c in (whole, ragged)]
    res = _ptx(jobs)
    for even, ragged in zip(res[::2], res[1::2]):
        assert even["loads"] > 0 and even["predicated"] == 0 and even["vector"] == even["loads"], even
        assert ragged["predicated"] > 0, ragged


def test_fp32_division_rounds_as_eager_where_a_rounding_op_reads_it():
    """Triton's fp32 `/` is div.full.f32 (within 2 ulp, subnormals flushed) and tl.sqrt is
    sqrt.approx: floor(a / b) could land one below eager's IEEE result. A division whose value
    reaches a rounding op, a comparison or an integer cast, and the mean's, compile to div.rn;
    sqrt to sqrt.rn; a constant divisor (the mean's too) is a multiply by its reciprocal, as in
    eager's CUDA kernels; a plain a / b (softmax's normalisation) keeps the fast division."""
    def exact(a, b):
        return (torch.floor(a / b), torch.div(a, b, rounding_mode="trunc"), ((a / b) * 2 + 0.5).floor(),
                (a / b) > 0.3, (a / (b + 1)).long(), a.abs().sqrt(), a.mean(-1), a.sum(-1) / 3)

    def fast(a, b):
        return a / b, torch.softmax(a, -1)

    def compiled(model):
        return _ptx(_model_jobs(model, torch.randn(64, 256), torch.randn(64, 256)))
    res = compiled(exact)
    assert sum(r["div.rn.f32"] for r in res) >= 2 and sum(r["sqrt.rn.f32"] for r in res) >= 1, res
    assert not any(r["div.full.f32"] or r["sqrt.approx"] for r in res), res
    assert all(r["div.full.f32"] and not r["div.rn.f32"] for r in compiled(fast)), compiled(fast)


def test_sigmoid_is_an_exp2_and_a_reciprocal():
    """An fp32 sigmoid (silu's, and the tanh GELU's after lower.fold_tanh) compiles to ex2.approx and
    rcp.approx.ftz, with no division: the SwiGLU epilogue of a matmul runs it on every tile."""
    def model(x):
        return F.silu(x), 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    res = _ptx(_model_jobs(model, torch.randn(64, 256)))
    assert all(r["rcp.approx.ftz.f32"] and not r["div.full.f32"] and not r["div.rn.f32"] for r in res), res

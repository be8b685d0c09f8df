"""Render a LoopKernel as CUDA C (jinja2 template), compiled with NVRTC through CuPy on a GPU
and with nvcc where there is no GPU (tests prove the sources build). Pointwise groups: one
thread per element, grid-stride. Reductions: one block per row, each thread strides over the
reduced dim, warp shuffles then shared memory combine; the prologue is recomputed per pass."""
from __future__ import annotations

import torch

from kiln.ir.scalar import Const, neutral
from .lower import LoopKernel, Reduce, compute_dtype
from .scalar_render import CU, CudaRenderer, reciprocal_of
from .schedule_stmts import plan_stages
from .templates import ENV

BLOCK = 256
_COMBINE = {"sum": "KilnSum", "mean": "KilnSum", "prod": "KilnProd", "max": "KilnMax", "min": "KilnMin",
            "any": "KilnMax", "all": "KilnMin"}


def _decompose(var: str, sizes: list[int], prefix: str) -> list[str]:
    out = []
    for i, s in enumerate(sizes):
        inner = 1
        for t in sizes[i + 1:]:
            inner *= t
        e = var if inner == 1 else f"({var} / {inner}LL)"
        if i > 0:
            e = f"({e} % {s}LL)"
        out.append(f"const long long {prefix}{i} = {e};")
    return out


def _addr(a) -> str:
    terms = [f"x{i} * {s}LL" for i, s in enumerate(a.xstrides) if s] + \
            [f"r{i} * {s}LL" for i, s in enumerate(a.rstrides) if s]
    return " + ".join(terms) if terms else "0"


def _acc_type(red: Reduce) -> str:
    return "int" if red.acc_dtype == __import__("torch").bool else CU[red.acc_dtype]


def render(lk: LoopKernel) -> tuple[str, dict]:
    rnd = CudaRenderer()
    prologue = []
    for a in range(lk.n_inputs):
        prologue.append(f"const {CU[lk_in_dtype(lk, a)]}* __restrict__ in{a} = "
                        f"reinterpret_cast<const {CU[lk_in_dtype(lk, a)]}*>(in_ptr{a});")
    for a in {a.arg: a for a in lk.stores}.values():
        prologue.append(f"{CU[a.dtype]}* __restrict__ out{a.arg} = reinterpret_cast<{CU[a.dtype]}*>(out_ptr{a.arg});")

    def load(a):
        if a.iota is not None:      # an arange: its element is its address (passes/iota.py)
            ct, off = CU[compute_dtype(a.dtype)], f" + {a.iota}LL" if a.iota else ""
            return f"const {ct} {a.var} = ({ct})({_addr(a)}{off});"
        return f"const {CU[compute_dtype(a.dtype)]} {a.var} = kiln_widen(in{a.arg}[{_addr(a)}]);"

    def stmt(s):
        return f"const {CU[compute_dtype(s.dtype)]} {s.var} = {rnd.render(s.expr)};"

    def store(a):
        return f"kiln_put(&out{a.arg}[{_addr(a)}], {a.var});"

    L: list[str] = []
    xn, rn = max(lk.xnumel, 1), lk.rnumel
    if lk.kind == "pointwise":
        L.append(f"for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < {xn}LL; "
                 f"x += (long long)gridDim.x * blockDim.x) {{")
        inner = _decompose("x", lk.xsizes, "x") + [load(a) for a in lk.loads] + [stmt(s) for s in lk.stmts] + \
            [store(a) for a in lk.stores]
        L += ["    " + s for s in inner] + ["}"]
    else:
        pre, stages, final = plan_stages(lk)
        L.append(f"for (long long x = blockIdx.x; x < {xn}LL; x += gridDim.x) {{")
        body = _decompose("x", lk.xsizes, "x")
        body += [load(a) for a in lk.loads if a.space == "x"] + [stmt(s) for s in pre]

        def loop(stage, tail):
            out = [f"for (long long r = threadIdx.x; r < {rn}LL; r += blockDim.x) {{"]
            inner = _decompose("r", lk.rsizes, "r") + [load(a) for a in stage.loop_loads] + \
                [stmt(s) for s in stage.loop_stmts] + tail
            return out + ["    " + s for s in inner] + ["}"]

        for st in stages:
            updates, results = [], []
            for red in st.reduces:
                rd: Reduce = red.expr
                acc = _acc_type(rd)
                lit = rnd.literal(Const(neutral(rd.kind, rd.acc_dtype), rd.acc_dtype))
                v = f"{red.var}_acc"
                body.append(f"{acc} {v} = ({acc})({lit});")
                updates.append(f"{v} = {_COMBINE[rd.kind]}()({v}, ({acc})({rd.src}));")
                res = f"kiln_block_reduce<{acc}>({v}, {_COMBINE[rd.kind]}())"
                if rd.kind == "mean":           # eager's mean multiplies by its factor (reciprocal_of)
                    dt = compute_dtype(rd.acc_dtype)
                    res = f"({res} * {rnd.literal(Const(reciprocal_of(rd.count, dt), dt))})"
                results.append(f"const {CU[compute_dtype(red.dtype)] if rd.acc_dtype != torch.bool else 'bool'} "
                               f"{red.var} = {res};")
            body += loop(st, updates) + results
            body += [stmt(s) for s in st.after]
        if final is not None:
            body += loop(final, [store(a) for a in lk.stores if a.space == "xr"])
        x_stores = [store(a) for a in lk.stores if a.space == "x"]
        if x_stores:
            body += ["if (threadIdx.x == 0) {"] + ["    " + s for s in x_stores] + ["}"]
        body.append("__syncthreads();")
        L += ["    " + s for s in body] + ["}"]
    params = [f"unsigned long long in_ptr{i}" for i in range(lk.n_inputs)] + \
             [f"unsigned long long out_ptr{i}" for i in range(lk.n_outputs)]
    src = ENV.get_template("cuda_kernel.cu.j2").render(name=lk.name, kind=lk.kind, ops=lk.ops, params=params,
                                                       prologue=prologue, body=L)
    return src, {"block": BLOCK}


def lk_in_dtype(lk: LoopKernel, arg: int):
    for a in lk.loads:
        if a.arg == arg:
            return a.dtype
    return lk.in_dtypes[arg] if getattr(lk, "in_dtypes", None) else __import__("torch").float32

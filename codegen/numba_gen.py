"""Render a LoopKernel as a numba CPU kernel (jinja2 template): a parallel loop over rows
(prange), the contiguous innermost dim as a plain loop LLVM can vectorise, reductions as scalar
accumulators with NaN-propagating max/min, the prologue recomputed in each pass over a row."""
from __future__ import annotations

import jinja2

from kiln.ir.scalar import Const, neutral
from .lower import LoopKernel, Reduce, compute_dtype
from .scalar_render import NP, NumbaRenderer
from .schedule_stmts import plan_stages
from .triton_gen import _decompose

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("kiln.codegen", "templates"),
                          keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)

IDIV = '''@numba.njit(inline="always")
def _idiv_trunc(a, b):
    q = abs(a) // abs(b)
    return -q if (a < 0) != (b < 0) else q


@numba.njit(inline="always")
def _idiv_floor(a, b):
    q = _idiv_trunc(a, b)
    return q - 1 if (q * b != a) and ((a < 0) != (b < 0)) else q


@numba.njit(inline="always")
def _idiv_mod(a, b):
    return a - _idiv_floor(a, b) * b


@numba.njit(inline="always")
def _idiv_fmod(a, b):
    return a - _idiv_trunc(a, b) * b'''

CHUNK = 2048


def _addr(a, xs: list[str], rs: list[str]) -> str:
    terms = [f"{v} * {s}" if s != 1 else v for v, s in zip(xs, a.xstrides) if s] + \
            [f"{v} * {s}" if s != 1 else v for v, s in zip(rs, a.rstrides) if s]
    return " + ".join(terms) if terms else "0"


def render(lk: LoopKernel) -> tuple[str, dict]:
    rnd = NumbaRenderer()
    L: list[str] = []
    xvars = [f"x{i}" for i in range(len(lk.xsizes))]
    rvars = [f"r{i}" for i in range(len(lk.rsizes))]

    def load(a):
        v = f"in{a.arg}[{_addr(a, xvars, rvars)}]"
        return f"{a.var} = {NP[compute_dtype(a.dtype)]}({v})" if a.dtype in NP else f"{a.var} = {v}"

    def store(a, ind):
        return f"{ind}out{a.arg}[{_addr(a, xvars, rvars)}] = {a.var}"

    def stmt(s):
        return f"{s.var} = {rnd.render(s.expr)}"

    ind = "    "
    if lk.kind == "pointwise":
        xs = lk.xsizes or [1]
        if len(xs) == 1:
            n = xs[0]
            nchunks = -(-n // CHUNK)
            L.append(f"for xo in numba.prange({nchunks}):")
            L.append(f"{ind}for x0 in range(xo * {CHUNK}, min({n}, (xo + 1) * {CHUNK})):")
            body_ind = ind * 2
        else:
            outer = 1
            for s in xs[:-1]:
                outer *= s
            L.append(f"for xo in numba.prange({outer}):")
            L += [ind + line for line in _decompose("xo", xs[:-1], "x")]
            L.append(f"{ind}for x{len(xs) - 1} in range({xs[-1]}):")
            body_ind = ind * 2
        if not lk.xsizes:
            xvars = []
        L += [body_ind + load(a) for a in lk.loads]
        L += [body_ind + stmt(s) for s in lk.stmts]
        L += [store(a, body_ind) for a in lk.stores]
    else:
        pre, stages, final = plan_stages(lk)
        L.append(f"for x in numba.prange({max(lk.xnumel, 1)}):")
        L += [ind + line for line in _decompose("x", lk.xsizes, "x")]
        L += [ind + load(a) for a in lk.loads if a.space == "x"]
        L += [ind + stmt(s) for s in pre]

        def loop(stage, tail):
            L.append(f"{ind}for r in range({lk.rnumel}):")
            inner = _decompose("r", lk.rsizes, "r")
            inner += [load(a) for a in stage.loop_loads] + [stmt(s) for s in stage.loop_stmts] + tail
            L.extend(ind * 2 + line for line in inner)

        for st in stages:
            rd: Reduce = st.reduce.expr
            acc = NP[rd.acc_dtype]
            lit = rnd.literal(Const(neutral(rd.kind, rd.acc_dtype), rd.acc_dtype))
            a = f"{st.reduce.var}"
            L.append(f"{ind}{a} = {acc}({lit})")
            src = f"{acc}({rd.src})"
            upd = {"sum": f"{a} += {src}", "mean": f"{a} += {src}", "prod": f"{a} *= {src}",
                   "max": f"{a} = {src} if ({src} > {a} or {src} != {src}) else {a}",
                   "min": f"{a} = {src} if ({src} < {a} or {src} != {src}) else {a}",
                   "any": f"{a} = {a} or {src}", "all": f"{a} = {a} and {src}"}[rd.kind]
            loop(st, [upd])
            if rd.kind == "mean":
                L.append(f"{ind}{a} = {acc}({a} / {float(rd.count)})")
            L += [ind + stmt(s) for s in st.after]
        if final is not None:
            loop(final, [store(a, "") for a in lk.stores if a.space == "xr"])
        L += [store(a, ind) for a in lk.stores if a.space == "x"]
    params = [f"in{i}" for i in range(lk.n_inputs)] + [f"out{i}" for i in range(lk.n_outputs)]
    helpers = [IDIV] if "_idiv_" in "\n".join(L) else []
    src = _ENV.get_template("numba_kernel.py.j2").render(
        name=lk.name, kind=lk.kind, ops=lk.ops, helpers=helpers, params=params, body=L)
    return src, {}

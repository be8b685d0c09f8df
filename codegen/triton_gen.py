"""Render a LoopKernel as a Triton kernel (jinja2 template): 1-D blocks for pointwise groups,
[XBLOCK, RBLOCK] tiles for reductions: one pass when a row fits in RBLOCK, otherwise loops over
the reduced dim with the prologue recomputed per loop. fp32 accumulation for 16-bit inputs."""
from __future__ import annotations

import re

from kiln.ir.scalar import Const, neutral
from .lower import LoopKernel, Reduce, compute_dtype
from .scalar_render import TL, TritonRenderer, reciprocal_of
from .schedule_stmts import Stage, online_softmax, plan_stages
from .templates import ENV


HELPERS = {
    "rint": """@triton.jit
def _rint(x):
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    r = tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))
    return tl.where(r == 0.0, x * 0.0, r)      # round(-0.4) is -0.0, as eager has it""",
    "pow": """@triton.jit
def _pow(a, b):
    r = tl.exp2(b * tl.log2(tl.abs(a)))
    bi = tl.floor(b)
    isint = bi == b
    odd = isint & ((bi - 2.0 * tl.floor(bi * 0.5)) == 1.0)
    r = tl.where((a < 0) & odd, -r, r)
    r = tl.where((a < 0) & (~isint), float('nan'), r)
    return tl.where(b == 0, 1.0, r)""",
    "ipow": """@triton.jit
def _ipow(a, b):
    r = a * 0 + 1
    for _ in range(63):
        r = tl.where(b > 0, tl.where((b & 1) == 1, r * a, r), r)
        a = a * a
        b = b >> 1
    return r""",
    "idiv": """@triton.jit
def _idiv_trunc(a, b):
    # Triton's integer // and % are C's (truncating), compiled and interpreted alike
    return a // b


@triton.jit
def _idiv_floor(a, b):
    q = a // b
    return tl.where((q * b != a) & ((a < 0) != (b < 0)), q - 1, q)


@triton.jit
def _idiv_mod(a, b):
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def _idiv_fmod(a, b):
    return a % b""",
    "erfc": """@triton.jit
def _erfc(x):
    # fp32 erfc(|x|) = 2^(z P(z)), z = min(|x|, 5), P a degree-10 least-squares fit of
    # log2(erfc(z)) / z on [0, 5]: within 3e-7 of erfc (relative 7e-6); past 5 the exponent falls
    # on at the slope erfc has there, to 0 at inf (NaN stays NaN). erfc(-|x|) = 2 - erfc(|x|).
    # Cheaper than libdevice's erf: bias+GELU+residual (bf16) compiles to 28 SASS instructions
    # per element against 40, and streams at 96% of an H200's copy bandwidth against 86%.
    a = tl.abs(x)
    z = tl.minimum(a, 5.0)
    p = z * 4.5185323926943965e-08 + -1.4033321349415928e-06
    p = p * z + 1.9087226974079385e-05
    p = p * z + -0.00014761263446416706
    p = p * z + 0.0006889196229167283
    p = p * z + -0.0016953973099589348
    p = p * z + -0.000944068597164005
    p = p * z + 0.028734248131513596
    p = p * z + -0.14884622395038605
    p = p * z + -0.9183048009872437
    p = p * z + -1.6279194355010986
    e = tl.math.exp2(p * z + (a - z) * -14.704957822420498)
    return tl.where(x < 0, 2.0 - e, e)""",
    "libdevice": """import os

from triton.language.extra import libdevice

_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _log1p(x):
    # libdevice's on a GPU; log(1 + x) lost x's low bits to the rounding of 1 + x (1.7e-4 relative
    # error at x = 2e-4). Interpreted (no libdevice there): Goldberg's log(u) * x / (u - 1)
    if _INTERPRETED:
        u = 1.0 + x
        return tl.where((u == 1.0) | (x == float("inf")), x, tl.log(u) * (x / (u - 1.0)))
    else:
        return libdevice.log1p(x)


@triton.jit
def _sigmoid(x):
    # fp32 1 / (1 + 2^(-x log2(e))) through ex2.approx.ftz and rcp.approx.ftz: five instructions
    # an element where tl.sigmoid's range-checked exp and div.full take twelve, with the same error
    # (the exp argument's rounding: 1.7e-6 relative at |x| = 30). A matmul epilogue (SwiGLU's
    # silu) runs on each tile while its tensor cores wait (bench/RESULTS.md, nineteenth session).
    # Interpreted (no inline PTX there): tl.sigmoid
    if _INTERPRETED:
        return tl.sigmoid(x)
    else:
        d = 1.0 + tl.math.exp2(x.to(tl.float32) * -1.4426950408889634)
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [d], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1) cancels for small |x| (1e-2 relative error at 1e-5). fp32: below 0.25
    # the odd series to x^11 (truncation under 1e-8 relative), above it the cancellation costs
    # <= 3 ulp; fp64: expm1(2x) / (expm1(2x) + 2)
    if x.dtype == tl.float64:
        e = _expm1(2.0 * x)
        return tl.where(tl.abs(x) > 20.0, tl.where(x > 0, 1.0, -1.0).to(tl.float64), e / (e + 2.0))
    else:
        x2 = x * x
        p = x2 * -0.008863235529902197 + 0.021869488536155203
        p = p * x2 + -0.05396825396825397
        p = p * x2 + 0.13333333333333333
        p = p * x2 + -0.3333333333333333
        return tl.where(tl.abs(x) < 0.25, x * (1.0 + x2 * p), 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))


@triton.jit
def _expm1(x):
    # libdevice's on a GPU. Interpreted: Kahan's (u - 1) * x / log(u), u = exp(x)
    if _INTERPRETED:
        u = tl.exp(x)
        v = u - 1.0
        return tl.where((u == 1.0) | (x == float("inf")), x, tl.where(v == -1.0, -1.0, v * (x / tl.log(u))))
    else:
        return libdevice.expm1(x)


@triton.jit
def _fmod(a, b):
    # exact, as C's fmod: libdevice's on a GPU; the interpreter's float % is numpy's fmod
    if _INTERPRETED:
        return a % b
    else:
        return libdevice.fmod(a, b)


@triton.jit
def _fmod_floor(a, b):
    m = _fmod(a, b)
    return tl.where((m != 0) & ((m < 0) != (b < 0)), m + b, m)


@triton.jit
def _fdiv_floor(a, b):
    # as ATen's div_floor_floating: from the exact fmod (1 // 0.1 is 9, not floor(1 / 0.1) = 10)
    m = _fmod(a, b)
    if a.dtype == tl.float32:     # IEEE division (Triton's fp32 `/` is within 2 ulp)
        q = tl.div_rn(a, b)
        d = tl.div_rn(a - m, b)
    else:
        q = a / b
        d = (a - m) / b
    d = tl.where((m != 0) & ((b < 0) != (m < 0)), d - 1, d)
    f = tl.floor(d)
    f = tl.where(d - f > 0.5, f + 1, f)
    neg = (q < 0) | ((q == 0) & (1 / q < 0))
    zero = tl.zeros_like(f)
    return tl.where(b == 0, q, tl.where(d == 0, tl.where(neg, zero * -1.0, zero), f))""",
    "maxnan": """@triton.jit
def _max_nan(a, b):
    if a.dtype.is_floating():       # one NaN-propagating max instruction (fmax.NaN)
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
    else:
        return tl.where(a > b, a, b)


@triton.jit
def _min_nan(a, b):
    if a.dtype.is_floating():
        return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)
    else:
        return tl.where(a < b, a, b)""",
}

RBLOCK_MAX = 8192
# A looped softmax's max and sum in one walk of the row (_online_softmax): correct against eager
# (tests/codegen/test_reduction_groups.py), compiled for sm_90, not yet timed on a GPU (it trades
# a walk of the row for a second exp per element). Off until a GPU run shows it faster:
# bench/online_softmax_ab.py (`bash bench/gpu_check.sh online`) times both.
ONLINE_SOFTMAX = False


def _decompose(var: str, sizes: list[int], prefix: str) -> list[str]:
    lines = []
    for i, s in enumerate(sizes):
        inner = 1
        for t in sizes[i + 1:]:
            inner *= t
        e = var if inner == 1 else f"({var} // {inner})"
        if i > 0:
            e = f"({e} % {s})"
        lines.append(f"{prefix}{i} = {e}")
    return lines


def _flat_scale(sizes: list[int], strides: list[int]) -> int | None:
    """c when ``strides`` walk ``sizes`` row-major times c (size-1 dims ignored), else None: such
    an access indexes with the flat ``x`` / ``r`` itself, no div/mod decomposition."""
    inner, c = 1, None
    for size, st in zip(reversed(sizes), reversed(strides)):
        if size != 1:
            if c is None:
                c = st
            if c == 0 or st != c * inner:
                return None
        inner *= size
    return c


def _dims(var: str, sizes: list[int], strides: list[int]) -> list[str]:
    c = _flat_scale(sizes, strides) if len([n for n in sizes if n != 1]) > 1 else None
    if c is not None:
        return [var if c == 1 else f"{var} * {c}"]
    return [f"{var}{i} * {s}" if s != 1 else f"{var}{i}" for i, s in enumerate(strides) if s]


def _addr(lk, a) -> str:
    terms = _dims("x", lk.xsizes, a.xstrides) + _dims("r", lk.rsizes, a.rstrides)
    # an access that walks no dim (a 0-d or all-broadcast tensor) still needs a block of
    # pointers: tl.load / tl.store refuse a block mask or value with a scalar pointer
    return " + ".join(terms) if terms else "x * 0"


def _load_mask(a, red: bool) -> str | None:
    """Only the bounds the address depends on: a row-broadcast weight needs no row mask (its
    address is valid on every row), and an access that walks nothing needs none at all."""
    parts = (["xmask"] if any(a.xstrides) else []) + (["rmask"] if red and any(a.rstrides) else [])
    return " & ".join(parts) or None


class _Emitter:
    def __init__(self, lk: LoopKernel):
        self.lk = lk
        self.r = TritonRenderer()
        self.lines: list[str] = []
        self.combiners: dict[str, str] = {}

    def load(self, a) -> str:
        cdt = TL[compute_dtype(a.dtype)]
        if a.iota is not None:      # an arange: its element is its address (a block, like a load's)
            return f"{a.var} = ({_addr(self.lk, a)}{f' + {a.iota}' if a.iota else ''}).to({cdt})"
        ptr = f"in_ptr{a.arg} + ({_addr(self.lk, a)})"
        mask = _load_mask(a, self.lk.kind == "reduction")
        v = f"tl.load({ptr}, mask={mask}, other=0)" if mask else f"tl.load({ptr})"
        return f"{a.var} = {v}" + (f".to({cdt})" if compute_dtype(a.dtype) != a.dtype else "")

    def stmt(self, s) -> str:
        if isinstance(s.expr, Const):        # a fill (full_like ...): a tensor, so .to() and stores work
            return f"{s.var} = tl.full([1], {self.r.literal(s.expr)}, {TL[compute_dtype(s.dtype)]})"
        return f"{s.var} = {self.r.render(s.expr)}"

    def combine(self, kind: str, a: str, b: str) -> str:
        """One step of a reduction of ``kind``: the loops' accumulation and the combine functions."""
        if kind in ("sum", "mean"):
            return f"{a} + {b}"
        if kind == "prod":
            return f"{a} * {b}"
        self.r.helpers.add("maxnan")
        return f"{'_max_nan' if kind in ('max', 'any') else '_min_nan'}({a}, {b})"

    def reduce_group(self, reds: list, srcs: list[str], mask: str) -> list[str]:
        """Lines computing the reductions ``reds`` of ``srcs`` along the row: one tl.reduce over a
        tuple when there are several, so they share one exchange between warps."""
        vals = [f"tl.where({mask}, {src}.to({TL[red.expr.acc_dtype]}), {self.neutral_lit(red.expr)})"
                for red, src in zip(reds, srcs)]
        if len(reds) == 1:
            return [f"{reds[0].var} = " + self.finish(reds[0].expr, self.reduce_expr(reds[0].expr, vals[0]))]
        kinds = [red.expr.kind for red in reds]
        fn = "_comb_" + "_".join(kinds)
        a = [f"a{i}" for i in range(len(reds))]
        b = [f"b{i}" for i in range(len(reds))]
        body = ", ".join(self.combine(k, x, y) for k, x, y in zip(kinds, a, b))
        self.combiners[fn] = f"@triton.jit\ndef {fn}({', '.join(a + b)}):\n    return {body}"
        tmp = [f"{red.var}_r" for red in reds]
        lines = [f"{', '.join(tmp)} = tl.reduce(({', '.join(vals)}), 1, {fn})"]
        return lines + [f"{red.var} = " + self.finish(red.expr, f"{t}[:, None]") for red, t in zip(reds, tmp)]

    def reduce_expr(self, red: Reduce, v: str) -> str:
        if red.kind in ("sum", "mean"):
            e = f"tl.sum({v}, 1)"
        elif red.kind == "prod":
            e = f"tl.reduce({v}, 1, _mul_combine)"
        elif red.kind in ("max", "any"):
            self.r.helpers.add("maxnan")
            e = f"tl.reduce({v}, 1, _max_nan)"
        else:
            self.r.helpers.add("maxnan")
            e = f"tl.reduce({v}, 1, _min_nan)"
        return f"{e}[:, None]"

    def finish(self, red: Reduce, e: str) -> str:
        if red.kind == "mean":
            dt = compute_dtype(red.acc_dtype)
            e = TritonRenderer.div(e, repr(float(red.count)), dt, reciprocal_of(red.count, dt) if red.count else None)
        return e

    def neutral_lit(self, red: Reduce) -> str:
        from kiln.ir.scalar import Const
        return self.r.literal(Const(neutral(red.kind, red.acc_dtype), red.acc_dtype))

    def store(self, a, mask: str) -> str:
        return f"tl.store(out_ptr{a.arg} + ({_addr(self.lk, a)}), " \
               f"{a.var}.to({TL[a.dtype]}), mask={mask})"


def _rmask() -> list[str]:
    # whole tiles only (RN a nonzero multiple of RBLOCK, both constexpr): a constant mask, which
    # Triton folds away, so loads and stores are unpredicated and vectorise fully
    return ["if RN % RBLOCK == 0 and RN > 0:", "    rmask = tl.full([1, RBLOCK], 1, tl.int1)", "else:", "    rmask = r < RN"]


def _online_softmax(em: _Emitter, first: Stage, second: Stage, sub: str, loop, full_mask: str) -> list[str]:
    """One walk for a row max m and a row sum of exp(a - m) (schedule_stmts.online_softmax): each
    lane keeps a running max and a sum scaled to it, rescaled by exp(old - new) when the max grows;
    the lanes combine at the end. A lane that has seen only -inf adds 0; a row of -inf sums to NaN,
    as the two walks give (exp(-inf - -inf)); NaN and +inf propagate as there."""
    m, s = first.reduces[0], second.reduces[0]
    am, asum = TL[m.expr.acc_dtype], TL[s.expr.acc_dtype]
    ninf = "float('-inf')"
    loads = list({a.var: a for a in first.loop_loads + second.loop_loads}.values())
    mine = {t.var for t in first.loop_stmts}
    later = [t for t in second.loop_stmts if t.var not in mine]
    body = [f"{m.var}_run = " + em.combine("max", f"{m.var}_acc",
                                           f"tl.where(xmask & rmask, {m.expr.src}.to({am}), {ninf})")]
    for t in later:       # the sum's terms against the running max
        line = em.stmt(t)
        body.append(re.sub(rf"\b{m.var}\b", f"{m.var}_run", line) if t.var == sub else line)
    body += [f"{s.var}_acc = {s.var}_acc * tl.where({m.var}_run == {ninf}, 1.0, tl.exp({m.var}_acc - {m.var}_run))"
             f" + tl.where(xmask & rmask & ({m.var}_run != {ninf}), {s.expr.src}.to({asum}), 0.0)",
             f"{m.var}_acc = {m.var}_run"]
    L = [f"{m.var}_acc = tl.full([XBLOCK, RBLOCK], {ninf}, {am})",
         f"{s.var}_acc = tl.full([XBLOCK, RBLOCK], 0.0, {asum})"]
    loop(Stage([], loads, first.loop_stmts, []), body, out=L)
    L += em.reduce_group([m], [f"{m.var}_acc"], full_mask)
    L += [em.stmt(t) for t in first.after]
    scaled = f"tl.where({m.var}_acc == {ninf}, 0.0, {s.var}_acc * tl.exp({m.var}_acc - {m.var}))"
    L += em.reduce_group([s], [scaled], full_mask)
    L.append(f"{s.var} = tl.where({m.var} == {ninf}, float('nan'), {s.var})")
    L += [em.stmt(t) for t in second.after]
    return L


def render(lk: LoopKernel, label: str | None = None) -> tuple[str, dict]:
    """``label``: what the source's header calls the kernel (default: its layout's kind)."""
    em = _Emitter(lk)
    L = em.lines
    red = lk.kind == "reduction"
    L += _decompose("x", lk.xsizes, "x")
    one_pass = red and lk.rnumel <= RBLOCK_MAX
    if not red:
        for a in lk.loads:
            L.append(em.load(a))
        for s in lk.stmts:
            L.append(em.stmt(s))
        for a in lk.stores:
            L.append(em.store(a, "xmask"))
    elif one_pass:
        L.append("r = tl.arange(0, RBLOCK)[None, :]")
        L += _rmask()
        L += _decompose("r", lk.rsizes, "r")
        for a in lk.loads:
            L.append(em.load(a))
        pre, stages, final = plan_stages(lk)
        done: set[str] = set()

        def emit(stmts):
            for s in stmts:
                if s.var not in done:
                    done.add(s.var)
                    L.append(em.stmt(s))
        emit(pre)
        for st in stages:
            emit(st.loop_stmts)
            L += em.reduce_group(st.reduces, [s.expr.src for s in st.reduces], "xmask & rmask")
            emit(st.after)
        if final is not None:
            emit(final.loop_stmts)
        for a in lk.stores:
            L.append(em.store(a, "xmask & rmask" if a.space == "xr" else "xmask"))
    else:
        pre, stages, final = plan_stages(lk)
        for a in lk.loads:
            if a.space == "x":
                L.append(em.load(a))
        L += [em.stmt(s) for s in pre]

        def loop(stage, body_end: list[str], out=None) -> list[str]:
            out = L if out is None else out
            out.append("for r_start in range(0, RN, RBLOCK):")
            inner = ["r = r_start + tl.arange(0, RBLOCK)[None, :]", *_rmask()]
            inner += _decompose("r", lk.rsizes, "r")
            inner += [em.load(a) for a in stage.loop_loads]
            inner += [em.stmt(s) for s in stage.loop_stmts]
            inner += body_end
            out.extend("    " + line for line in inner)
            return out

        online = online_softmax(lk, stages) if ONLINE_SOFTMAX else {}
        full_mask = "xmask & (tl.arange(0, RBLOCK)[None, :] < RBLOCK)"
        i = 0
        while i < len(stages):
            st = stages[i]
            if i in online:
                L += _online_softmax(em, st, stages[i + 1], online[i], loop, full_mask)
                i += 2
                continue
            updates = []
            for red in st.reduces:
                rd: Reduce = red.expr
                acc = TL[rd.acc_dtype]
                n = em.neutral_lit(rd)
                L.append(f"{red.var}_acc = tl.full([XBLOCK, RBLOCK], {n}, {acc})")
                v = f"tl.where(xmask & rmask, {rd.src}.to({acc}), {n})"
                updates.append(f"{red.var}_acc = " + em.combine(rd.kind, f"{red.var}_acc", v))
            loop(st, updates)
            L += em.reduce_group(st.reduces, [f"{red.var}_acc" for red in st.reduces], full_mask)
            L += [em.stmt(s) for s in st.after]
            i += 1
        if final is not None:
            loop(final, [em.store(a, "xmask & rmask") for a in lk.stores if a.space == "xr"])
        for a in lk.stores:
            if a.space == "x":
                L.append(em.store(a, "xmask"))
    helpers = [HELPERS[h] for h in sorted(em.r.helpers)]
    if "_mul_combine" in "\n".join(L):
        helpers.append("@triton.jit\ndef _mul_combine(a, b):\n    return a * b")
    helpers += list(em.combiners.values())
    params = [f"in_ptr{i}" for i in range(lk.n_inputs)] + [f"out_ptr{i}" for i in range(lk.n_outputs)]
    span = max([1] + [sum((s - 1) * abs(t) for s, t in zip(lk.xsizes + lk.rsizes, a.xstrides + a.rstrides)) + 1
                      for a in lk.loads + lk.stores])
    wide = span >= 2**31 - 1 or lk.xnumel * max(lk.rnumel, 1) >= 2**31 - 1
    src = ENV.get_template("triton_kernel.py.j2").render(
        name=lk.name, kind=lk.kind, label=label, ops=lk.ops, helpers=helpers, params=params, body=L, wide=wide)
    row = [a.dtype.itemsize for a in lk.loads + lk.stores if any(a.rstrides) and a.iota is None]
    shared = any(any(a.rstrides) and not any(a.xstrides) for a in lk.loads if a.iota is None)
    return src, {"one_pass": one_pass, "itemsize": max(row or [4]), "shared_row": shared}

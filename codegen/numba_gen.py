"""Render a LoopKernel as a numba CPU kernel (jinja2 template).

Shape of the generated code (every choice measured on a 2-core AVX-512 CPU, fp32 4096x2048):
- a serial ``nogil`` numba function that takes row ranges ``[lo, hi)`` from a shared atomic
  counter; the module's entry point runs it on several threads (numba_runtime.parallel_for).
  Serial kernels compile ~2x faster than ``parallel=True`` ones (no parfor lowering, no gufunc
  wrapper).
- all index arithmetic in uint64: numba wraps negative indices for signed ones, and that check
  on ``x * stride + r`` (whose sign LLVM cannot prove) turned every load into a gather and cost
  10-15x on a row sum. Strides are never negative in PyTorch.
- rows are the kept (x) dims; the reduced (r) dims, or the innermost kept dim of a pointwise
  kernel, are plain ``range`` loops over the contiguous dim that LLVM vectorises. Several r dims
  are nested loops, so no element pays an index div/mod; x dims are decomposed once per row.
- reductions are scalar accumulators (``reassoc`` on the accumulating add alone, numba_math._radd,
  lets LLVM vectorise sums without licensing rewrites like x * 0 + x -> x elsewhere); float max/
  min use ``llvm.maximum``/``llvm.minimum`` (NaN-propagating like torch), which vectorise where
  a compare-and-select with a NaN test does not. The prologue is recomputed in each pass over a
  row (a row of 2048 fp32 is 8 KiB and stays in L1).
- fp32 exp/erf/tanh are polynomial helpers (numba_math, called by NumbaRenderer's output): libm
  calls are scalar and stop the loop from vectorising (numba's SVML path needs an SVML-patched
  LLVM, which the llvmlite wheels are not). The header carries numba_math's source hash, so a
  change there gives every kernel a new file and a fresh numba cache entry.
- the source holds no kernel name, so identical groups share one file, one module and one numba
  compilation (the entry is always ``kernel``).
"""
from __future__ import annotations

import re

import torch

from kiln.ir.scalar import Const, E, neutral
from .lower import LoopKernel, Reduce, compute_dtype, refs, row_vars
from .numba_math import EXPORTS, SOURCE_HASH
from .scalar_render import NP, NumbaRenderer
from .schedule_stmts import Stage, plan_stages
from .templates import ENV


ENTRY = "kernel"
# only FMA contraction: no reassoc (see numba_math._radd), no arcp (1 / y overflows for tiny y),
# no nsz (x + 0 folded to x keeps -0.0, and 1 / (x + 0) came out -inf where eager gives inf)
FASTMATH = '{"contract"}'
CHUNK = 4096            # elements per row when a pointwise kernel has a single (flat) dim
GRAIN = 1 << 16         # least work (elements x passes) worth handing to another thread


def U(n: int) -> str:
    return f"np.uint64({int(n)})"


def _addr(a, xs: list[str], rs: list[str]) -> str:
    terms = [f"{v} * {U(s)}" if s != 1 else v for v, s in zip(xs, a.xstrides) if s] + \
            [f"{v} * {U(s)}" if s != 1 else v for v, s in zip(rs, a.rstrides) if s]
    return " + ".join(terms) if terms else U(0)


def _decompose(var: str, sizes: list[int], prefix: str) -> list[str]:
    """x0, x1, ... of a flat row index (uint64), outermost first."""
    lines = []
    for i, s in enumerate(sizes):
        inner = 1
        for t in sizes[i + 1:]:
            inner *= t
        e = var if inner == 1 else f"({var} // {U(inner)})"
        if i > 0:
            e = f"({e} % {U(s)})"
        lines.append(f"{prefix}{i} = {e}")
    return lines


EXPENSIVE = {"exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "erf", "erfc", "tanh", "sigmoid", "gelu",
             "gelu_tanh", "sin", "cos", "tan", "sinh", "cosh", "pow"}


def _expensive(e) -> bool:
    return isinstance(e, E) and (e.op.rstrip("_") in EXPENSIVE or any(_expensive(a) for a in e.args))


def _stash(lk: LoopKernel, stages, final):
    """Softmax-like kernels: the final pass over a row recomputes an expensive value (exp(x - max))
    that the last reduction pass already computed. Instead, that pass writes the value into the
    output row, and the final pass reads it back (from L1: a row is a few KiB) and overwrites
    it. Returns (var, output access used as the row buffer, the final stage without the
    recomputation), or None. Only for reductions (never run in place, so the output aliases no
    input) whose final pass stores one xr output of the value's own dtype, walking every r dim."""
    if final is None or not stages:
        return None
    last = stages[-1]
    mine = {s.var: s for s in last.loop_stmts}
    theirs = {s.var: s for s in final.loop_stmts}
    common = set(mine) & set(theirs)
    stores = [a for a in lk.stores if a.space == "xr"]
    store_vars = {a.var for a in stores}
    # values of the shared cone that the final pass uses directly (outside the shared cone)
    used = {r for s in final.loop_stmts if s.var not in common for r in refs(s.expr)} | store_vars
    cands = [v for v in common if v in used and v not in store_vars]
    if len(cands) != 1:
        return None
    var = cands[0]

    def cone_expensive(v, seen=None):
        seen = seen if seen is not None else set()
        if v in seen or v not in mine:
            return False
        seen.add(v)
        e = mine[v].expr
        return _expensive(e) or any(cone_expensive(r, seen) for r in refs(e))
    if not cone_expensive(var):
        return None
    dt = compute_dtype(mine[var].dtype)
    buf = next((a for a in stores if a.dtype == dt and all(a.rstrides)), None)
    if buf is None:
        return None
    need: set[str] = set()
    stack = [a.var for a in stores]
    while stack:
        v = stack.pop()
        if v in need or v == var:
            continue
        need.add(v)
        if v in theirs:
            stack.extend(refs(theirs[v].expr))
    new_final = Stage([], [a for a in final.loop_loads if a.var in need],
                      [s for s in final.loop_stmts if s.var in need], [])
    return var, buf, new_final


def _next_row_stage(stages, final, stash) -> bool:
    """Can row x + 1's first reduction pass run inside row x's final pass? The first pass reads
    the row from memory (the later ones find it in L1), so on its own it waits on DRAM while the
    final pass only computes; run together, the next row's loads overlap the current row's
    arithmetic (softmax 2.91 -> 2.22 ms, add+RMSNorm 2.61 -> 2.53 ms on one core, fp32
    4096x2048). Only when that pass depends on nothing but its own loads (no per-row values),
    and is not where the stash is written."""
    if final is None or not stages or (stash is not None and len(stages) == 1):
        return False
    st0 = stages[0]
    own = {a.var for a in st0.loop_loads} | {s.var for s in st0.loop_stmts}
    used = {r for s in st0.loop_stmts for r in refs(s.expr)} | {red.expr.src for red in st0.reduces}
    return used <= own


def _hoisted(lk: LoopKernel, load, stmt) -> tuple[list[str], list[str]]:
    """A pointwise kernel's loads and statements split into those of the row (lower.row_vars)
    and those of each element. LLVM
    cannot hoist the row's loads itself (the output may alias any input), so a cross-entropy's
    gradient recomputed its whole per-row prologue for every element."""
    row = row_vars(lk)
    outer = [load(a) for a in lk.loads if a.var in row] + [stmt(s) for s in lk.stmts if s.var in row]
    inner = [load(a) for a in lk.loads if a.var not in row] + [stmt(s) for s in lk.stmts if s.var not in row]
    return outer, inner


def _in_place_pairs(lk: LoopKernel) -> list[tuple[int, int]]:
    """(output, input) pairs of a pointwise kernel that the memory planner may run in place:
    every load of the input reads exactly the element the output's store writes, in its dtype.
    When they share memory at run time, LLVM's run-time alias check fails and the loop runs
    its scalar version (measured 13x slower for bias+GELU+residual); the entry point then calls a
    variant that stores through the input's own array instead, which vectorises (same base, same
    index). Variants compile lazily, on their first call, so a kernel never run in place pays
    nothing for them."""
    pairs = []
    for st in lk.stores:
        for i in sorted({a.arg for a in lk.loads}):
            loads = [a for a in lk.loads if a.arg == i]
            if all(a.dtype == st.dtype and a.xstrides == st.xstrides and a.rstrides == st.rstrides for a in loads):
                pairs.append((st.arg, i))
    return pairs


def render(lk: LoopKernel) -> tuple[str, dict]:
    rnd = NumbaRenderer()
    L: list[str] = []
    variants: list[tuple[int, int, list[str]]] = []      # (output, input it aliases, body)
    xvars = [f"x{i}" for i in range(len(lk.xsizes))]
    rvars = [f"r{i}" for i in range(len(lk.rsizes))]
    ind = "    "

    def load(a, xs=None, suffix=""):
        v = f"in{a.arg}[{_addr(a, xvars if xs is None else xs, rvars)}]"
        if a.iota is not None:      # an arange: its element is its address (passes/iota.py)
            v = f"({_addr(a, xvars if xs is None else xs, rvars)}{f' + {U(a.iota)}' if a.iota else ''})"
        return f"{a.var}{suffix} = {NP[compute_dtype(a.dtype)]}({v})" if a.dtype in NP else f"{a.var}{suffix} = {v}"

    def store(a, into=None):
        return f"{into or f'out{a.arg}'}[{_addr(a, xvars, rvars)}] = {a.var}"

    def stmt(s):
        return f"{s.var} = {rnd.render(s.expr)}"

    if lk.kind == "pointwise":
        xs = lk.xsizes or [1]
        if len(xs) == 1:
            n = xs[0]
            rows, per_row = -(-n // CHUNK), min(n, CHUNK)
            L.append(f"for xo in range(np.uint64(lo), np.uint64(hi)):")
            L.append(f"{ind}for x0 in range(xo * {U(CHUNK)}, min({U(n)}, xo * {U(CHUNK)} + {U(CHUNK)})):")
            outer, inner = [], [load(a) for a in lk.loads] + [stmt(s) for s in lk.stmts]
        else:
            rows, per_row = 1, xs[-1]
            for s in xs[:-1]:
                rows *= s
            L.append(f"for xo in range(np.uint64(lo), np.uint64(hi)):")
            L += [ind + line for line in _decompose("xo", xs[:-1], "x")]
            outer, inner = _hoisted(lk, load, stmt)
            L += [ind + line for line in outer]
            L.append(f"{ind}for x{len(xs) - 1} in range({U(xs[-1])}):")
        if not lk.xsizes:
            xvars = []
        head = list(L)
        L += [ind * 2 + line for line in inner + [store(a) for a in lk.stores]]
        for j, i in _in_place_pairs(lk):
            into = {j: f"in{i}"}
            variants.append((j, i, head + [ind * 2 + line for line in
                                           inner + [store(a, into.get(a.arg)) for a in lk.stores]]))
        passes = 1
    else:
        pre, stages, final = plan_stages(lk)
        rows, per_row = max(lk.xnumel, 1), lk.rnumel
        row_loop = len(L)
        L.append(f"for x in range(np.uint64(lo), np.uint64(hi)):")
        L += [ind + line for line in _decompose("x", lk.xsizes, "x")]
        L += [ind + load(a) for a in lk.loads if a.space == "x"]
        L += [ind + stmt(s) for s in pre]

        def loop(stage, tail, head=(), base=1, out=L):
            depth = base
            for rv, rs in zip(rvars, lk.rsizes):
                out.append(f"{ind * depth}for {rv} in range({U(rs)}):")
                depth += 1
            inner = list(head) + [load(a) for a in stage.loop_loads] + [stmt(s) for s in stage.loop_stmts] + tail
            out.extend(ind * depth + line for line in inner)

        stash = _stash(lk, stages, final)
        if stash is not None:
            var, sa, final = stash
            L_stash = f"out{sa.arg}[{_addr(sa, xvars, rvars)}] = {var}"
            stash_load = f"{var} = {NP[compute_dtype(sa.dtype)]}(out{sa.arg}[{_addr(sa, xvars, rvars)}])"

        def update(rd: Reduce, a: str, src_var: str) -> str:
            src = f"{NP[rd.acc_dtype]}({src_var})"
            if rd.kind in ("max", "min") and rd.acc_dtype.is_floating_point:
                rnd.helpers.add("fminmax")
                return f"{a} = _f{'maximum' if rd.kind == 'max' else 'minimum'}({a}, {src})"
            if rd.kind in ("sum", "mean", "prod") and rd.acc_dtype.is_floating_point:
                rnd.helpers.add("racc")         # reassoc on the accumulation alone (numba_math)
                return f"{a} = _r{'mul' if rd.kind == 'prod' else 'add'}({a}, {src})"
            return {"sum": f"{a} += {src}", "mean": f"{a} += {src}", "prod": f"{a} *= {src}",
                    "max": f"{a} = {src} if {src} > {a} else {a}",
                    "min": f"{a} = {src} if {src} < {a} else {a}",
                    "any": f"{a} = {a} | {src}", "all": f"{a} = {a} & {src}"}[rd.kind]

        def neutral_lit(rd: Reduce) -> str:
            return rnd.literal(Const(neutral(rd.kind, rd.acc_dtype), rd.acc_dtype))

        nxt = _next_row_stage(stages, final, stash)
        if nxt:
            # the first reduction of row x + 1 runs inside row x's final pass (see _next_row_stage)
            st0 = stages[0]
            yvars = [f"y{i}" for i in range(len(lk.xsizes))]
            names = {a.var for a in st0.loop_loads} | {s.var for s in st0.loop_stmts} | {r.var for r in st0.reduces}
            ren = re.compile(r"\b(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")\b")

            def renamed(line: str) -> str:
                return ren.sub(lambda m: m.group(1) + "_nx", line)
            inits0 = [f"{r.var}_nx = {neutral_lit(r.expr)}" for r in st0.reduces]
            body0 = [load(a, yvars, "_nx") for a in st0.loop_loads] + [renamed(stmt(s)) for s in st0.loop_stmts] + \
                [renamed(update(r.expr, r.var, r.expr.src)) for r in st0.reduces]
            first = inits0 + ["if np.uint64(lo) < np.uint64(hi):"]
            first += [ind + line for line in _decompose("np.uint64(lo)", lk.xsizes, "y")]
            loop(Stage([], [], [], []), body0, base=1, out=first)
            L[row_loop:row_loop] = first

        for i, st in enumerate(stages):
            if nxt and i == 0:
                L += [f"{ind}{r.var} = {r.var}_nx" for r in st.reduces]
            else:
                L += [f"{ind}{r.var} = {neutral_lit(r.expr)}" for r in st.reduces]
                loop(st, [update(r.expr, r.var, r.expr.src) for r in st.reduces] +
                     ([L_stash] if stash is not None and st is stages[-1] else []))
            for r in st.reduces:
                rd: Reduce = r.expr
                if rd.kind == "mean":
                    cnt = rnd.literal(Const(float(rd.count), rd.acc_dtype)) if rd.acc_dtype.is_floating_point \
                        else repr(float(rd.count))
                    L.append(f"{ind}{r.var} = {NP[rd.acc_dtype]}({r.var} / {cnt})")
            L += [ind + stmt(s) for s in st.after]
        if final is not None:
            tail = [store(a) for a in lk.stores if a.space == "xr"]
            head = [stash_load] if stash is not None else []
            if not nxt:
                loop(final, tail, head)
            else:
                # the last row of a chunk reads itself again instead (from L1; the result is unused)
                L.append(f"{ind}xn = x + np.uint64(1) if x + np.uint64(1) < np.uint64(hi) else x")
                L += [ind + line for line in _decompose("xn", lk.xsizes, "y")]
                L += [ind + line for line in inits0]
                loop(final, tail + body0, head)
        L += [ind + store(a) for a in lk.stores if a.space == "x"]
        passes = len(stages) + (final is not None)
    # enough rows per thread that each chunk carries at least GRAIN element-passes
    min_rows = max(1, -(-GRAIN // max(per_row * passes, 1)))
    names = [f"in{i}" for i in range(lk.n_inputs)] + [f"out{i}" for i in range(lk.n_outputs)]
    unpack = _unpack(lk, names)
    params = [f"{n}_{part}" for n in names for part in ("p", "n")] if unpack else names
    text = "\n".join(L)
    if "_idiv_" in text:
        rnd.helpers.add("idiv")
    imports = sorted(n for h in rnd.helpers for n in EXPORTS[h])
    src = ENV.get_template("numba_kernel.py.j2").render(
        kind=lk.kind, ops=list(dict.fromkeys(lk.ops)), imports=imports, math_hash=SOURCE_HASH,
        params=params, body=L, entry=ENTRY, rows=rows, min_rows=min_rows, fastmath=FASTMATH,
        variants=variants, unpack=unpack, variant_names=[f"_rows_out{j}_in{i}" for j, i, _ in variants])
    return src, {"entry": ENTRY, "rows": rows, "min_rows": min_rows, "pointers": bool(unpack)}


def _unpack(lk: LoopKernel, names: list[str]) -> list[str]:
    """The kernel's buffers as arrays over the (address, length) pairs it takes, one line each;
    none (the kernel takes numpy arrays) when a buffer's dtype has no numba scalar type. A
    launch passing four tensors spent 7.3 us making numpy arrays of them and 0.4 in the call;
    their addresses take 1.0 (codegen/loader.py)."""
    dtypes: dict[str, torch.dtype] = {}
    for a in lk.loads:
        if a.iota is None:
            dtypes.setdefault(f"in{a.arg}", a.dtype)
    for a in lk.stores:
        dtypes.setdefault(f"out{a.arg}", a.dtype)
    if any(dt not in NP for dt in dtypes.values()):
        return []
    # an input no load reads (an arange the kernel computes) is a pointer all the same
    return [f"{n} = numba.carray(_ptr({n}_p, {NP[dtypes.get(n, torch.uint8)]}(0)), {n}_n)" for n in names]

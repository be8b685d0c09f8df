"""Render a LoopKernel as a numba CPU kernel (jinja2 template).

Shape of the generated code (every choice measured on a 2-core AVX-512 CPU, fp32 4096x2048):
- a serial ``nogil`` numba function over a row range ``[lo, hi)``; the module's entry point hands
  row chunks to threads (numba_runtime.parallel_for). Serial kernels compile ~2x faster than
  ``parallel=True`` ones (no parfor lowering, no gufunc wrapper).
- all index arithmetic in uint64: numba wraps negative indices for signed ones, and that check
  on ``x * stride + r`` (whose sign LLVM cannot prove) turned every load into a gather and cost
  10-15x on a row sum. Strides are never negative in PyTorch.
- rows are the kept (x) dims; the reduced (r) dims, or the innermost kept dim of a pointwise
  kernel, are plain ``range`` loops over the contiguous dim that LLVM vectorises. Several r dims
  are nested loops, so no element pays an index div/mod; x dims are decomposed once per row.
- reductions are scalar accumulators (fastmath ``reassoc`` lets LLVM vectorise sums); float max/
  min use ``llvm.maximum``/``llvm.minimum`` (NaN-propagating like torch), which vectorise where
  a compare-and-select with a NaN test does not. The prologue is recomputed in each pass over a
  row (a row of 2048 fp32 is 8 KiB and stays in L1).
- fp32 exp/erf/tanh are polynomial helpers emitted into the source (NumbaRenderer): libm calls
  are scalar and stop the loop from vectorising (numba's SVML path needs an SVML-patched LLVM,
  which the llvmlite wheels are not).
- the source holds no kernel name, so identical groups share one file, one module and one numba
  compilation (the entry is always ``kernel``).
"""
from __future__ import annotations

import jinja2

from kiln.ir.scalar import Const, neutral
from .lower import LoopKernel, Reduce, compute_dtype
from .scalar_render import NP, NumbaRenderer
from .schedule_stmts import plan_stages

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("kiln.codegen", "templates"),
                          keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)

ENTRY = "kernel"
FASTMATH = '{"reassoc", "contract", "nsz", "arcp"}'

# helper sources a kernel may need, by the name NumbaRenderer (or render) records in .helpers;
# each is emitted into the kernel's own source so its content hash covers them.
_LLVM = """from llvmlite import ir as _llvm_ir
from numba import types as _nbt
from numba.core import cgutils as _cgutils
from numba.extending import intrinsic"""

HELPERS = {
    "idiv": (), "i32_as_f32": (), "fminmax": (), "exp32": ("i32_as_f32",), "erf32": (), "tanh32": (),
    "rsqrt32": (), "rsqrt64": (),
}

HELPER_SRC = {
    "idiv": '''@numba.njit(inline="always")
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
    return a - _idiv_trunc(a, b) * b''',
    "i32_as_f32": '''@intrinsic
def _i32_as_f32(typingctx, i):
    """The float32 whose bits are the int32 ``i`` (a bitcast; vectorises)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _llvm_ir.FloatType())
    return _nbt.float32(_nbt.int32), codegen''',
    "fminmax": '''def _llvm_binary(name):
    @intrinsic
    def f(typingctx, a, b):
        """llvm.maximum / llvm.minimum: NaN-propagating like torch, and vectorisable as a reduction."""
        if not (isinstance(a, _nbt.Float) and a == b):
            return None
        def codegen(context, builder, sig, args):
            ty = args[0].type
            fn = _cgutils.get_or_insert_function(builder.module, _llvm_ir.FunctionType(ty, [ty, ty]),
                                                 f"llvm.{name}.f{a.bitwidth}")
            return builder.call(fn, args)
        return a(a, a), codegen
    return f


_fmaximum = _llvm_binary("maximum")
_fminimum = _llvm_binary("minimum")''',
    "exp32": '''@numba.njit(fastmath={"contract", "nsz"}, error_model="numpy")
def _exp32(x):
    """float32 exp (Cephes expf: Cody-Waite reduction, degree-5 polynomial, 2^n by bit
    construction): < 1 ulp, vectorisable; exp(-inf) = 0, exp(+inf) = inf, NaN propagates."""
    xc = min(max(x, np.float32(-104.0)), np.float32(88.75))
    fx = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = xc - fx * np.float32(0.693359375)
    r = r - fx * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * (r * r) + r + np.float32(1.0)
    n = np.int32(fx)
    n1 = n >> np.int32(1)
    y = y * _i32_as_f32((n1 + np.int32(127)) << np.int32(23)) * _i32_as_f32((n - n1 + np.int32(127)) << np.int32(23))
    y = np.float32(0.0) if x < np.float32(-104.0) else y
    y = np.float32(np.inf) if x > np.float32(88.72283935546875) else y
    return x if x != x else y''',
    "erf32": '''@numba.njit(fastmath={"contract", "nsz"}, error_model="numpy")
def _erf32(x):
    """float32 erf: the rational approximation Eigen and XLA use (odd 9/even 12), within
    ~4e-7 absolute, saturating to +-1 beyond |x| = 3.8325; vectorisable."""
    x2 = x * x
    p = np.float32(0.00022905065861350646)
    p = p * x2 + np.float32(0.0034082910107109506)
    p = p * x2 + np.float32(0.050955695062380861)
    p = p * x2 + np.float32(0.18520832239976145)
    p = p * x2 + np.float32(1.128379143519084)
    q = np.float32(-1.1791602954361697e-7)
    q = q * x2 + np.float32(0.000023547966471313185)
    q = q * x2 + np.float32(0.0010179625278914885)
    q = q * x2 + np.float32(0.014070470171167667)
    q = q * x2 + np.float32(0.11098505178285362)
    q = q * x2 + np.float32(0.49746925110067538)
    q = q * x2 + np.float32(1.0)
    y = x * p / q
    s = np.float32(1.0) if x > np.float32(0.0) else np.float32(-1.0)
    return s if abs(x) >= np.float32(3.832506856900711) else y''',
    "tanh32": '''@numba.njit(fastmath={"contract", "nsz"}, error_model="numpy")
def _tanh32(x):
    """float32 tanh: Eigen's odd 13/6 rational approximation on [-7.9053, 7.9053], +-1 beyond
    (within 3e-7 of tanh there), x itself below |x| = 4e-4; a few ulp, vectorisable."""
    xc = min(max(x, np.float32(-7.90531110763549805)), np.float32(7.90531110763549805))
    x2 = xc * xc
    p = np.float32(-2.76076847742355e-16)
    p = p * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    y = xc * p / q
    y = (np.float32(1.0) if x > np.float32(0.0) else np.float32(-1.0)) if abs(x) >= np.float32(7.90531110763549805) else y
    y = x if abs(x) < np.float32(0.0004) else y
    return x if x != x else y''',
    "rsqrt32": '''@numba.njit(fastmath={"contract", "nsz"}, error_model="numpy")
def _rsqrt32(x):
    return np.float32(1.0) / math.sqrt(x)''',
    "rsqrt64": '''@numba.njit(fastmath={"contract", "nsz"}, error_model="numpy")
def _rsqrt64(x):
    return 1.0 / math.sqrt(x)''',
}


def helper_sources(names) -> list[str]:
    """The helpers named and those they depend on, dependencies first, in a fixed order."""
    need: set[str] = set()
    stack = list(names)
    while stack:
        h = stack.pop()
        if h not in need:
            need.add(h)
            stack.extend(HELPERS[h])
    return [HELPER_SRC[h] for h in HELPERS if h in need]
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


def render(lk: LoopKernel) -> tuple[str, dict]:
    rnd = NumbaRenderer()
    L: list[str] = []
    xvars = [f"x{i}" for i in range(len(lk.xsizes))]
    rvars = [f"r{i}" for i in range(len(lk.rsizes))]
    ind = "    "

    def load(a):
        v = f"in{a.arg}[{_addr(a, xvars, rvars)}]"
        return f"{a.var} = {NP[compute_dtype(a.dtype)]}({v})" if a.dtype in NP else f"{a.var} = {v}"

    def store(a):
        return f"out{a.arg}[{_addr(a, xvars, rvars)}] = {a.var}"

    def stmt(s):
        return f"{s.var} = {rnd.render(s.expr)}"

    if lk.kind == "pointwise":
        xs = lk.xsizes or [1]
        if len(xs) == 1:
            n = xs[0]
            rows, per_row = -(-n // CHUNK), min(n, CHUNK)
            L.append(f"for xo in range(np.uint64(lo), np.uint64(hi)):")
            L.append(f"{ind}for x0 in range(xo * {U(CHUNK)}, min({U(n)}, xo * {U(CHUNK)} + {U(CHUNK)})):")
        else:
            rows, per_row = 1, xs[-1]
            for s in xs[:-1]:
                rows *= s
            L.append(f"for xo in range(np.uint64(lo), np.uint64(hi)):")
            L += [ind + line for line in _decompose("xo", xs[:-1], "x")]
            L.append(f"{ind}for x{len(xs) - 1} in range({U(xs[-1])}):")
        if not lk.xsizes:
            xvars = []
        body = [load(a) for a in lk.loads] + [stmt(s) for s in lk.stmts] + [store(a) for a in lk.stores]
        L += [ind * 2 + line for line in body]
        passes = 1
    else:
        pre, stages, final = plan_stages(lk)
        rows, per_row = max(lk.xnumel, 1), lk.rnumel
        L.append(f"for x in range(np.uint64(lo), np.uint64(hi)):")
        L += [ind + line for line in _decompose("x", lk.xsizes, "x")]
        L += [ind + load(a) for a in lk.loads if a.space == "x"]
        L += [ind + stmt(s) for s in pre]

        def loop(stage, tail):
            depth = 1
            for rv, rs in zip(rvars, lk.rsizes):
                L.append(f"{ind * depth}for {rv} in range({U(rs)}):")
                depth += 1
            inner = [load(a) for a in stage.loop_loads] + [stmt(s) for s in stage.loop_stmts] + tail
            L.extend(ind * depth + line for line in inner)

        for st in stages:
            rd: Reduce = st.reduce.expr
            a = st.reduce.var
            lit = rnd.literal(Const(neutral(rd.kind, rd.acc_dtype), rd.acc_dtype))
            L.append(f"{ind}{a} = {lit}")
            src = f"{NP[rd.acc_dtype]}({rd.src})"
            if rd.kind in ("max", "min") and rd.acc_dtype.is_floating_point:
                rnd.helpers.add("fminmax")
                upd = f"{a} = _f{'maximum' if rd.kind == 'max' else 'minimum'}({a}, {src})"
            else:
                upd = {"sum": f"{a} += {src}", "mean": f"{a} += {src}", "prod": f"{a} *= {src}",
                       "max": f"{a} = {src} if {src} > {a} else {a}",
                       "min": f"{a} = {src} if {src} < {a} else {a}",
                       "any": f"{a} = {a} | {src}", "all": f"{a} = {a} & {src}"}[rd.kind]
            loop(st, [upd])
            if rd.kind == "mean":
                cnt = rnd.literal(Const(float(rd.count), rd.acc_dtype)) if rd.acc_dtype.is_floating_point \
                    else repr(float(rd.count))
                L.append(f"{ind}{a} = {NP[rd.acc_dtype]}({a} / {cnt})")
            L += [ind + stmt(s) for s in st.after]
        if final is not None:
            loop(final, [store(a) for a in lk.stores if a.space == "xr"])
        L += [ind + store(a) for a in lk.stores if a.space == "x"]
        passes = len(stages) + (final is not None)
    # enough rows per thread that each chunk carries at least GRAIN element-passes
    min_rows = max(1, -(-GRAIN // max(per_row * passes, 1)))
    params = [f"in{i}" for i in range(lk.n_inputs)] + [f"out{i}" for i in range(lk.n_outputs)]
    text = "\n".join(L)
    if "_idiv_" in text:
        rnd.helpers.add("idiv")
    helpers = helper_sources(rnd.helpers)
    src = _ENV.get_template("numba_kernel.py.j2").render(
        kind=lk.kind, ops=list(dict.fromkeys(lk.ops)), helpers=helpers, params=params, body=L,
        entry=ENTRY, rows=rows, min_rows=min_rows, fastmath=FASTMATH,
        llvm=_LLVM if any("@intrinsic" in h for h in helpers) else "")
    return src, {"entry": ENTRY, "rows": rows, "min_rows": min_rows}

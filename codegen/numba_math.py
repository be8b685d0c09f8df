"""Scalar helpers that generated numba kernels call (NumbaRenderer / numba_gen emit the calls).

exp, expm1, log, log1p, tanh (fp32 and fp64) and erf (fp32) are branch-free polynomial or
rational approximations built from float and integer lane operations (exponent bits through
bitcasts, 2^n through ``vscalef`` on AVX-512): libm calls are scalar and keep LLVM from
vectorising the loop around them (numba's SVML path needs an SVML-patched LLVM, which the
llvmlite wheels are not). Accuracy against float64 references is in
tests/codegen/test_numba_math.py: <= 1 ulp for exp, expm1, log (fp32), <= 2 for log1p and
fp32 tanh, <= 3 for fp64 tanh, <= 6 (4e-7 absolute) for fp32 erf; special values as libm. Each helper is its own njit function with its own
fast-math flags (no ``reassoc``/``arcp``), and LLVM inlines it into the kernel keeping those
flags, so the kernel's looser flags never reorder the range reduction or turn 1/sqrt into an
estimate; the reduction steps ``_radd``/``_rmul`` are the other way round (``reassoc`` on the
accumulation alone). They live in one module, compiled once per process (and cached on disk by numba),
rather than in every kernel source: that saves ~0.1 s of numba compile per kernel that uses one.

numba's disk cache does not notice when a function a cached kernel calls has changed, so every
kernel source carries ``SOURCE_HASH`` (numba_gen puts it in the header): editing this file
changes every kernel's content hash, hence its file, hence its numba cache entry.
"""
from __future__ import annotations

import hashlib
import math

import numba
import numpy as np
from llvmlite import ir as _llvm_ir
from numba import types as _nbt
from numba.core import cgutils as _cgutils
from numba.extending import intrinsic

with open(__file__, "rb") as _f:
    SOURCE_HASH = hashlib.sha256(_f.read()).hexdigest()[:16]

_FM = {"contract", "nsz"}


# -- integer division with PyTorch's (C) sign conventions -------------------------------------
@numba.njit(inline="always")
def _idiv_floor(a, b):
    if b == 0:      # eager's CPU kernels raise this too (numba's numpy error model would return 0)
        raise RuntimeError("ZeroDivisionError")
    return a // b   # numba's integer // floors, as Python's (exact: no abs, which overflows at the minimum)


@numba.njit(inline="always")
def _idiv_trunc(a, b):
    q = _idiv_floor(a, b)
    return q + 1 if (q * b != a) and ((a < 0) != (b < 0)) else q


@numba.njit(inline="always")
def _idiv_mod(a, b):
    if b == 0:
        raise RuntimeError("ZeroDivisionError")
    return a % b    # Python's: the divisor's sign, as torch.remainder


@numba.njit(inline="always")
def _idiv_fmod(a, b):
    r = _idiv_mod(a, b)
    return r - b if r != 0 and (r < 0) != (a < 0) else r


# -- LLVM intrinsics ------------------------------------------------------------------------------
def _bitcast(src, dst):
    """The ``dst`` whose bits are those of ``src`` (int32 <-> float32, int64 <-> float64): one
    LLVM bitcast, which vectorises (lane-wise ``vpslld``/``vpaddd`` on the integer side)."""
    llvm_ty = {_nbt.float32: _llvm_ir.FloatType(), _nbt.float64: _llvm_ir.DoubleType(),
               _nbt.int32: _llvm_ir.IntType(32), _nbt.int64: _llvm_ir.IntType(64)}[dst]

    @intrinsic
    def f(typingctx, v):
        if not isinstance(v, (_nbt.Integer, _nbt.Float)):
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(context.cast(builder, args[0], sig.args[0], src), llvm_ty)
        return dst(v), codegen
    return f


_i32_as_f32 = _bitcast(_nbt.int32, _nbt.float32)
_f32_as_i32 = _bitcast(_nbt.float32, _nbt.int32)
_i64_as_f64 = _bitcast(_nbt.int64, _nbt.float64)
_f64_as_i64 = _bitcast(_nbt.float64, _nbt.int64)


@intrinsic
def _ldexp(typingctx, x, n):
    """x * 2^n (llvm.ldexp): one ``vscalefps``/``vscalefpd`` per vector on AVX-512, rounding
    once, with overflow to inf and subnormal results handled by the instruction. Elsewhere LLVM
    lowers it to a scalar libm call, so only used when ``_SCALEF``."""
    if not (isinstance(x, _nbt.Float) and isinstance(n, _nbt.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ty = args[0].type
        nv = context.cast(builder, args[1], sig.args[1], _nbt.int32)
        fn = _cgutils.get_or_insert_function(builder.module, _llvm_ir.FunctionType(ty, [ty, _llvm_ir.IntType(32)]),
                                             f"llvm.ldexp.f{x.bitwidth}.i32")
        return builder.call(fn, [args[0], nv])
    return x(x, n), codegen


def _host_has_scalef() -> bool:
    """Does numba compile for a host with AVX-512 (``vscalef``)?"""
    try:
        from llvmlite import binding as llvm
        if numba.config.CPU_NAME not in (None, "host"):
            return False
        return "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")
    except Exception:                               # noqa: BLE001 - no feature query: the portable path
        return False


_SCALEF = _host_has_scalef()


@intrinsic
def _claim(typingctx, ctr, i):
    """Atomically add 1 to ``ctr[i]`` (an int64 array, a constant index) and return its old
    value. Threads running one kernel take row chunks from ``ctr[0]`` and count the chunks they
    finish in ``ctr[1]``: a thread that starts late (its core busy with another process, or
    with OpenMP threads still spinning after an eager op) finds no chunk left and touches
    nothing, so the launching thread waits for finished work, not for late threads."""
    if not (isinstance(ctr, _nbt.Array) and ctr.dtype == _nbt.int64 and isinstance(i, _nbt.IntegerLiteral)):
        return None
    idx = i.literal_value

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [_llvm_ir.Constant(_llvm_ir.IntType(64), idx)])
        return builder.atomic_rmw("add", ptr, _llvm_ir.Constant(_llvm_ir.IntType(64), 1), "seq_cst")
    return _nbt.int64(ctr, i), codegen


@intrinsic
def _ptr(typingctx, addr, like):
    """The integer ``addr`` as a pointer to ``like``'s type: a kernel's buffers arrive as
    addresses and lengths (``numba.carray`` makes them arrays), because turning a tensor into a
    numpy array for the call cost more host time than the call (codegen/loader.py)."""
    if not (isinstance(addr, _nbt.Integer) and isinstance(like, (_nbt.Number, _nbt.Boolean))):
        return None
    ptr_t = _nbt.CPointer(like)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr_t))
    return ptr_t(addr, like), codegen


def _llvm_binary(name):
    @intrinsic
    def f(typingctx, a, b):
        """llvm.maximum / llvm.minimum: NaN-propagating like torch.amax/amin, and LLVM vectorises
        a reduction through them, where a compare-and-select with a NaN test stays scalar."""
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
_fminimum = _llvm_binary("minimum")


# -- float remainder ------------------------------------------------------------------------------
@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _fmod_floor(a, b):
    """torch.remainder on floats: the exact fmod moved to the divisor's sign, as ATen computes it
    (a - floor(a / b) * b was off by whole multiples of b once a / b lost its integer part)."""
    m = np.fmod(a, b)
    return m + b if m != 0 and (m < 0) != (b < 0) else m


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _fdiv_floor(a, b, one):
    """Floor division of floats as ATen's div_floor_floating computes it, from the exact fmod:
    1 // 0.1 is 9 (0.1 is a little over a tenth) where floor(1 / 0.1) is 10, and inf // x is NaN.
    ``one`` is 1 in the operands' type (a bare literal would widen float32 to float64)."""
    if b == 0:
        return a / b
    m = np.fmod(a, b)
    d = (a - m) / b
    if m != 0 and (b < 0) != (m < 0):
        d -= one
    if d == 0:
        return np.copysign(d, a / b)
    f = np.floor(d)
    return f + one if d - f > 0.5 else f


# -- reduction steps -------------------------------------------------------------------------------
# The one place a kernel may reassociate: its sums' and products' accumulating add / multiply carry
# ``reassoc`` on their own instruction, which is what LLVM's loop vectoriser needs to split a sum
# over vector lanes. The kernel itself is compiled without it: under a function-wide ``reassoc``
# LLVM rewrote ``x * 0 + x`` as ``x`` (inf where eager gives NaN).
@numba.njit(fastmath={"reassoc", "contract", "nsz"}, error_model="numpy", cache=True)
def _radd(a, b):
    return a + b


@numba.njit(fastmath={"reassoc", "contract", "nsz"}, error_model="numpy", cache=True)
def _rmul(a, b):
    return a * b


# -- exp, expm1, tanh ----------------------------------------------------------------------------
# x = n ln2 + r with n = round(x / ln2) taken from the low mantissa bits of x / ln2 + 1.5 * 2^p
# (no float->int conversion, no floor), |r| <= ln2 / 2, e^r = 1 + r + r^2 P(r), and 2^n built
# from its exponent bits. Clamping x first (a select that lets NaN through, so NaN propagates
# with no test of its own) bounds n; splitting 2^n into 2^(n//2) * 2^(n - n//2) makes overflow
# (inf) and subnormal results come out of the two multiplications by themselves, so exp needs
# no special-value selects at all.
_SHIFT32 = np.float32(12582912.0)                  # 1.5 * 2^23
_SHIFT32_BITS = np.int32(0x4B400000)
_SHIFT64 = 6755399441055744.0                      # 1.5 * 2^52
_SHIFT64_BITS = np.int64(0x4338000000000000)


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _expm1r32(x):
    """(n, e^r - 1) for float32 x, clamped to [-104, 89]."""
    xc = np.float32(-104.0) if x < np.float32(-104.0) else x
    xc = np.float32(89.0) if xc > np.float32(89.0) else xc
    k = xc * np.float32(1.4426950408889634) + _SHIFT32
    fn = k - _SHIFT32
    r = xc - fn * np.float32(0.693359375)            # Cody-Waite: n * ln2_hi is exact
    r = r - fn * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)                  # Cephes expf, < 1 ulp
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return _f32_as_i32(k) - _SHIFT32_BITS, p * (r * r) + r


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _scale32(q, n):
    """(1 + q) 2^n without ``vscalef``: exact, subnormal and overflowing results included."""
    n1 = n >> np.int32(1)
    s1 = _i32_as_f32((n1 + np.int32(127)) << np.int32(23))
    s2 = _i32_as_f32((n - n1 + np.int32(127)) << np.int32(23))
    return (q * s1 + s1) * s2


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _exp32(x):
    """float32 exp, < 1 ulp; exp(-inf) = 0, exp(+inf) = inf, subnormal results exact to 1 ulp,
    NaN propagates. Branch- and select-free after the clamp: 2^n is one ``vscalefps`` on
    AVX-512 (24 vector instructions per 16 lanes, load and store included), two
    multiplications by 2^(n//2) and 2^(n - n//2) elsewhere."""
    n, q = _expm1r32(x)
    if _SCALEF:
        return _ldexp(q + np.float32(1.0), n)
    return _scale32(q, n)


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _expm1_neg32(x):
    """float32 expm1 for x <= 64: 2^n - 1 + 2^n (e^r - 1), no cancellation for small x (n = 0
    gives e^r - 1 itself); -1 below -18."""
    n, q = _expm1r32(np.float32(-18.0) if x < np.float32(-18.0) else x)
    s = _i32_as_f32((n + np.int32(127)) << np.int32(23))
    return q * s + (s - np.float32(1.0))


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _expm1_32(x):
    """float32 expm1, < 2 ulp: as _expm1_neg32, with 2^n split as 2^(n-64) * 2^64 above n = 64
    so results up to FLT_MAX (and inf beyond) come out right."""
    n, q = _expm1r32(np.float32(-18.0) if x < np.float32(-18.0) else x)
    h = np.int32(64) if n > np.int32(64) else np.int32(0)
    s = _i32_as_f32((n - h + np.int32(127)) << np.int32(23))
    t = _i32_as_f32((np.int32(127) - h) << np.int32(23))
    y = (q * s + (s - t)) * _i32_as_f32((h + np.int32(127)) << np.int32(23))
    return x if abs(x) < np.float32(5.9604645e-08) else y          # x itself below 2^-24 (keeps -0.0)


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _expm1r64(x):
    """(n, e^r - 1) for float64 x, clamped to [-746, 710]; e^r - 1 by its Taylor series to
    r^13 (the next term is below 5e-18 for |r| <= ln2 / 2)."""
    xc = -746.0 if x < -746.0 else x
    xc = 710.0 if xc > 710.0 else xc
    k = xc * 1.4426950408889634 + _SHIFT64
    fn = k - _SHIFT64
    r = xc - fn * 6.93147180369123816490e-01         # fdlibm ln2_hi: n * ln2_hi is exact
    r = r - fn * 1.90821492927058770002e-10
    p = 1.6059043836821613e-10
    p = p * r + 2.08767569878681e-09
    p = p * r + 2.505210838544172e-08
    p = p * r + 2.755731922398589e-07
    p = p * r + 2.7557319223985893e-06
    p = p * r + 2.48015873015873e-05
    p = p * r + 0.0001984126984126984
    p = p * r + 0.001388888888888889
    p = p * r + 0.008333333333333333
    p = p * r + 0.041666666666666664
    p = p * r + 0.16666666666666666
    p = p * r + 0.5
    return _f64_as_i64(k) - _SHIFT64_BITS, p * (r * r) + r


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _scale64(q, n):
    """(1 + q) 2^n without ``vscalef``, as _scale32."""
    n1 = n >> np.int64(1)
    s1 = _i64_as_f64((n1 + np.int64(1023)) << np.int64(52))
    s2 = _i64_as_f64((n - n1 + np.int64(1023)) << np.int64(52))
    return (q * s1 + s1) * s2


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _exp64(x):
    """float64 exp, ~1 ulp, same special values as _exp32."""
    n, q = _expm1r64(x)
    if _SCALEF:
        return _ldexp(q + 1.0, n)
    return _scale64(q, n)


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _expm1_neg64(x):
    """float64 expm1 for x <= 512, as _expm1_neg32; -1 below -40."""
    n, q = _expm1r64(-40.0 if x < -40.0 else x)
    s = _i64_as_f64((n + np.int64(1023)) << np.int64(52))
    return q * s + (s - 1.0)


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _expm1_64(x):
    """float64 expm1, as _expm1_32 (2^n split above n = 512)."""
    n, q = _expm1r64(-40.0 if x < -40.0 else x)
    h = np.int64(512) if n > np.int64(512) else np.int64(0)
    s = _i64_as_f64((n - h + np.int64(1023)) << np.int64(52))
    t = _i64_as_f64((np.int64(1023) - h) << np.int64(52))
    y = (q * s + (s - t)) * _i64_as_f64((h + np.int64(1023)) << np.int64(52))
    return x if abs(x) < 1.1102230246251565e-16 else y               # x itself below 2^-53


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _tanh32(x):
    """float32 tanh(|x|) = -t / (t + 2) with t = expm1(-2|x|) (no cancellation: t + 2 is in
    [1, 2]), sign restored; x itself below |x| = 2^-12 (keeps -0.0), +-1 for +-inf, NaN
    propagates."""
    t = _expm1_neg32(np.float32(-2.0) * abs(x))
    y = -t / (t + np.float32(2.0))
    y = y if x >= np.float32(0.0) else -y
    return x if abs(x) < np.float32(0.000244140625) else y


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _tanh64(x):
    """float64 tanh, as _tanh32; x itself below |x| = 2^-27."""
    t = _expm1_neg64(-2.0 * abs(x))
    y = -t / (t + 2.0)
    y = y if x >= 0.0 else -y
    return x if abs(x) < 7.450580596923828e-09 else y


# -- log ------------------------------------------------------------------------------------------
# x = 2^e m with m in [sqrt(2)/2, sqrt(2)) from the exponent and mantissa bits (subnormal x
# scaled up first), f = m - 1 exactly, and fdlibm's log(1 + f) = f - f^2/2 + s (f^2/2 + R(s^2)),
# s = f / (2 + f): the division's error only touches the small correction term.
@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _log32(x):
    """float32 log (musl logf's polynomial), < 1 ulp; log(0) = -inf, log(x < 0) = NaN,
    log(inf) = inf, NaN propagates, subnormal x exact."""
    sub = x < np.float32(1.1754943508222875e-38)
    xs = x * np.float32(8388608.0) if sub else x
    i = _f32_as_i32(xs) - np.int32(0x3F3504F3)       # bits of sqrt(2)/2
    e = (i >> np.int32(23)) - (np.int32(23) if sub else np.int32(0))
    f = _i32_as_f32((i & np.int32(0x7FFFFF)) + np.int32(0x3F3504F3)) - np.float32(1.0)
    s = f / (np.float32(2.0) + f)
    z = s * s
    w = z * z
    t1 = w * (np.float32(0.40000972152) + w * np.float32(0.24279078841))
    t2 = z * (np.float32(0.66666662693) + w * np.float32(0.28498786688))
    hfsq = np.float32(0.5) * f * f
    dk = np.float32(e)
    y = s * (hfsq + t2 + t1) + dk * np.float32(9.0580006145e-06) - hfsq + f + dk * np.float32(6.9313812256e-01)
    y = y if x < np.float32(np.inf) else x            # inf
    y = np.float32(-np.inf) if x == np.float32(0.0) else y
    return np.float32(np.nan) if not (x >= np.float32(0.0)) else y      # x < 0 and NaN


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _log64(x):
    """float64 log (fdlibm's polynomial), < 1 ulp; special values as _log32."""
    sub = x < 2.2250738585072014e-308
    xs = x * 18014398509481984.0 if sub else x       # 2^54
    i = _f64_as_i64(xs) - np.int64(0x3FE6A09E667F3BCD)   # bits of sqrt(2)/2
    e = (i >> np.int64(52)) - (np.int64(54) if sub else np.int64(0))
    f = _i64_as_f64((i & np.int64(0xFFFFFFFFFFFFF)) + np.int64(0x3FE6A09E667F3BCD)) - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01))
    t2 = z * (6.666666666666735130e-01 + w * (2.857142874366239149e-01
                                             + w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)))
    hfsq = 0.5 * f * f
    dk = np.float64(e)
    y = dk * 6.93147180369123816490e-01 - ((hfsq - (s * (hfsq + t2 + t1) + dk * 1.90821492927058770002e-10)) - f)
    y = y if x < np.inf else x
    y = -np.inf if x == 0.0 else y
    return np.nan if not (x >= 0.0) else y


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _log1p32(x):
    """float32 log1p = log(u) x / (u - 1) with u = 1 + x rounded (u - 1 is exact, so the ratio
    puts back what the rounding of 1 + x lost; Goldberg's trick), x itself where u == 1 (keeps
    -0.0 and tiny x exact), inf at inf; < 2 ulp."""
    u = np.float32(1.0) + x
    y = _log32(u) * (x / (u - np.float32(1.0)))
    y = x if u == np.float32(1.0) else y
    return x if x == np.float32(np.inf) else y


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _log1p64(x):
    """float64 log1p, as _log1p32."""
    u = 1.0 + x
    y = _log64(u) * (x / (u - 1.0))
    y = x if u == 1.0 else y
    return x if x == np.inf else y


# -- erf ------------------------------------------------------------------------------------------
@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _erf32(x):
    """float32 erf: the rational approximation Eigen and XLA use (odd degree 9 over even degree
    12), within 4e-7 absolute, +-1 beyond |x| = 3.8325."""
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
    return s if abs(x) >= np.float32(3.832506856900711) else y


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _rsqrt32(x):
    """1/sqrt(x) without ``arcp``: under it LLVM uses a reciprocal-sqrt estimate plus a Newton
    step, which is NaN at 0 and inf and 1 ulp off elsewhere."""
    return np.float32(1.0) / math.sqrt(x)


@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _rsqrt64(x):
    return 1.0 / math.sqrt(x)


# helper name (as NumbaRenderer / numba_gen record it) -> the names a kernel imports for it
EXPORTS = {
    "idiv": ("_idiv_trunc", "_idiv_floor", "_idiv_mod", "_idiv_fmod"),
    "fminmax": ("_fmaximum", "_fminimum"), "racc": ("_radd", "_rmul"), "fmod": ("_fmod_floor", "_fdiv_floor"),
    "exp32": ("_exp32",), "exp64": ("_exp64",), "expm1_32": ("_expm1_32",), "expm1_64": ("_expm1_64",),
    "tanh32": ("_tanh32",), "tanh64": ("_tanh64",), "log32": ("_log32",), "log64": ("_log64",),
    "log1p32": ("_log1p32",), "log1p64": ("_log1p64",),
    "erf32": ("_erf32",),
    "rsqrt32": ("_rsqrt32",), "rsqrt64": ("_rsqrt64",),
}

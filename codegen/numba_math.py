"""Scalar helpers that generated numba kernels call (NumbaRenderer / numba_gen emit the calls).

fp32 exp/erf/tanh are branch-free polynomial or rational approximations: libm calls are scalar
and keep LLVM from vectorising the loop around them (numba's SVML path needs an SVML-patched
LLVM, which the llvmlite wheels are not). Each helper is its own njit function with its own
fast-math flags (no ``reassoc``/``arcp``), and LLVM inlines it into the kernel keeping those
flags, so the kernel's looser flags never reorder the range reduction or turn 1/sqrt into an
estimate. They live in one module, compiled once per process (and cached on disk by numba),
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
    return a - _idiv_trunc(a, b) * b


# -- LLVM intrinsics ------------------------------------------------------------------------------
@intrinsic
def _i32_as_f32(typingctx, i):
    """The float32 whose bits are the int32 ``i`` (a bitcast; vectorises)."""
    if not isinstance(i, _nbt.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], _nbt.int32)
        return builder.bitcast(v, _llvm_ir.FloatType())
    return _nbt.float32(i), codegen


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


# -- fp32 transcendental functions --------------------------------------------------------------
@numba.njit(fastmath=_FM, error_model="numpy", cache=True)
def _exp32(x):
    """float32 exp (Cephes expf: Cody-Waite reduction, degree-5 polynomial, 2^n built from its
    bits in two halves so subnormal results come out right): < 1 ulp; exp(-inf) = 0,
    exp(+inf) = inf, NaN propagates."""
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
    return x if x != x else y


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
def _tanh32(x):
    """float32 tanh: Eigen's odd 13/6 rational approximation on [-7.9053, 7.9053], +-1 beyond
    (within 3e-7 of tanh there), x itself below |x| = 4e-4; a few ulp."""
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
    return x if x != x else y


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
    "fminmax": ("_fmaximum", "_fminimum"),
    "exp32": ("_exp32",), "erf32": ("_erf32",), "tanh32": ("_tanh32",),
    "rsqrt32": ("_rsqrt32",), "rsqrt64": ("_rsqrt64",),
}

"""The vectorisable math helpers of the numba kernels (codegen/numba_math.py) against float64
references: ulp error over float32 bit patterns spread across the whole range (normal,
subnormal, huge, both signs), float64 samples, special values (NaN, +-inf, +-0, overflow and
underflow boundaries), and a check that a loop around each helper vectorises."""
from __future__ import annotations

import math
import re

import numba
import numpy as np
import pytest

from kiln.codegen import numba_math as M

SPECIAL32 = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, -1e-45, -0.5, -0.99999994, 1e-8, -1e-8, 1.1754943508222875e-38, 3e-39,
             88.72283935546875, 88.7228432, 88.8, 89.5, -87.3, -103.0, -103.9, -104.0, -104.5, -200.0,
             1.0, -1.0, 0.5, 3.0, -3.0, 9.0, -9.0, 20.0, -20.0, 3.4028234663852886e38]
SPECIAL64 = [math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, -5e-324, -0.5, -0.9999999999999999, 1e-17, 2.2250738585072014e-308, 1e-310,
             709.782712893384, 709.79, 710.5, -708.4, -745.13, -745.2, -746.0, -800.0, 1.0, -1.0, 0.5,
             3.0, -3.0, 19.0, -19.0, 40.0, -40.0, 1.7976931348623157e308]


def _ordered(x: np.ndarray) -> np.ndarray:
    """Floats as integers that count ulps across zero (+0 and -0 alike)."""
    u = x.view(np.uint32 if x.dtype == np.float32 else np.uint64)
    sign = u.dtype.type(1) << u.dtype.type(u.dtype.itemsize * 8 - 1)
    mag = (u & (sign - u.dtype.type(1))).astype(object)
    return np.where((u & sign) != 0, -mag, mag)


def _ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    d = np.abs(_ordered(got) - _ordered(want))
    both_nan = np.isnan(got) & np.isnan(want)
    one_nan = np.isnan(got) != np.isnan(want)
    return np.where(both_nan, 0, np.where(one_nan, 1 << 40, d)).astype(np.float64)


def _vectorised(h, dtype):
    @numba.njit(fastmath={"reassoc", "contract", "nsz", "arcp"}, error_model="numpy")
    def loop(x, out):
        for i in range(np.uint64(x.shape[0])):
            out[i] = h(x[i])
    return loop


def _run(h, x):
    out = np.empty_like(x)
    f = _vectorised(h, x.dtype)
    f(x, out)
    return out, f


REF = {"exp": np.exp, "expm1": np.expm1, "log": np.log, "log1p": np.log1p, "tanh": np.tanh, "erf": np.vectorize(math.erf)}
# (helper, reference, max ulp over the float32 sweep, max ulp over the float64 samples)
CASES32 = [("_exp32", "exp", 1), ("_expm1_32", "expm1", 1), ("_log32", "log", 1), ("_log1p32", "log1p", 2),
           ("_tanh32", "tanh", 2),
           ("_erf32", "erf", 6)]        # erf: Eigen's rational approximation, 4e-7 absolute
CASES64 = [("_exp64", "exp", 1), ("_expm1_64", "expm1", 2), ("_log64", "log", 1), ("_log1p64", "log1p", 2),
           ("_tanh64", "tanh", 3)]


def _sweep32() -> np.ndarray:
    """Every 4099th float32 bit pattern (both signs, all exponents) plus the special values."""
    bits = np.arange(0, 1 << 32, 4099, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([bits.view(np.float32), np.array(SPECIAL32, np.float32)])


@pytest.mark.parametrize("name,ref,max_ulp", CASES32)
def test_float32_ulp(name, ref, max_ulp):
    x = _sweep32()
    with np.errstate(all="ignore"):
        want = REF[ref](x.astype(np.float64)).astype(np.float32)
    got, f = _run(getattr(M, name), x)
    err = _ulps(got, want)
    worst = int(np.argmax(err))
    assert err[worst] <= max_ulp, (name, float(x[worst]), float(got[worst]), float(want[worst]), err[worst])
    ir = f.inspect_llvm(f.signatures[0])
    assert re.search(r"<\d+ x float>", ir), f"{name}: the loop did not vectorise"
    assert not re.search(r"call [^\n]*@(exp|expf|log|logf|tanh|tanhf|erf|erff|ldexpf|llvm\.(exp|log)2?\.f32)\b", ir), name


@pytest.mark.parametrize("name,ref,max_ulp", CASES64)
def test_float64_ulp(name, ref, max_ulp):
    rng = np.random.default_rng(0)
    lo = {"exp": -750.0, "expm1": -50.0, "log": 0.0, "log1p": -1.0, "tanh": -25.0}[ref]
    hi = {"exp": 715.0, "expm1": 715.0, "log": 1e6, "log1p": 1e6, "tanh": 25.0}[ref]
    parts = [rng.uniform(lo, hi, 200_000), rng.uniform(-2, 2, 100_000), np.array(SPECIAL64)]
    tiny = np.exp(rng.uniform(-740, 0, 50_000))
    parts += [tiny, -tiny] if ref != "log" else [tiny, np.exp(rng.uniform(0, 709, 50_000))]
    if ref.startswith("log"):        # every exponent, subnormals included
        parts.append(np.abs(rng.integers(0, 1 << 63, 100_000, dtype=np.int64).view(np.float64)))
    x = np.concatenate(parts)
    with np.errstate(all="ignore"):
        want = REF[ref](x)
    got, f = _run(getattr(M, name), x)
    err = _ulps(got, want)
    worst = int(np.argmax(err))
    assert err[worst] <= max_ulp, (name, float(x[worst]), float(got[worst]), float(want[worst]), err[worst])
    assert re.search(r"<\d+ x double>", f.inspect_llvm(f.signatures[0])), f"{name}: the loop did not vectorise"


@pytest.mark.parametrize("name", ["_exp32", "_expm1_32", "_log32", "_log1p32", "_tanh32", "_erf32",
                                  "_exp64", "_expm1_64", "_log64", "_log1p64", "_tanh64"])
def test_special_values(name):
    """NaN propagates; +-inf, +-0 and the overflow/underflow edges give what libm gives."""
    ref = REF[name.strip("_").removesuffix("32").removesuffix("64").rstrip("_")]
    dt = np.float32 if name.endswith("32") else np.float64
    x = np.array(SPECIAL32 if dt == np.float32 else SPECIAL64, dt)
    with np.errstate(all="ignore"):
        want = ref(x.astype(np.float64)).astype(dt)
    got, _ = _run(getattr(M, name), x)
    for xi, g, w in zip(x, got, want):
        if math.isnan(w) or math.isinf(w) or w == 0.0:
            assert (math.isnan(g) and math.isnan(w)) or g == w, (name, xi, g, w)
        else:
            assert abs(float(g) - float(w)) <= 8 * abs(float(w)) * float(np.finfo(dt).eps), (name, xi, g, w)


@pytest.mark.parametrize("bits", [32, 64])
def test_portable_scaling_path(bits):
    """The 2^(n//2) * 2^(n - n//2) scaling that exp uses without AVX-512 gives the same values
    (within 1 ulp: vscalef rounds once, the portable path may round twice for subnormals)."""
    reduce_, scale = (M._expm1r32, M._scale32) if bits == 32 else (M._expm1r64, M._scale64)

    @numba.njit(fastmath={"contract", "nsz"}, error_model="numpy")
    def exp_portable(x):
        n, q = reduce_(x)
        return scale(q, n)
    if bits == 32:
        x = _sweep32()
    else:
        x = np.concatenate([np.random.default_rng(1).uniform(-750, 715, 200_000), np.array(SPECIAL64)])
    got, _ = _run(exp_portable, x)
    with np.errstate(all="ignore"):
        want = np.exp(x.astype(np.float64)).astype(x.dtype)
    assert _ulps(got, want).max() <= 1

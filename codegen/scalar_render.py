"""Render scalar expression trees (kiln.ir.scalar) as Triton or numba source text. Values are
computed in their compute dtype (fp32 for 16-bit floats); explicit conversions round exactly as
eager does. Integer division and remainder use sign-explicit formulas so Triton (C semantics),
its interpreter (numpy semantics) and numba (Python semantics) all agree with PyTorch."""
from __future__ import annotations

import math

import numpy as np

import torch

from kiln.ir.scalar import Const, E, Ref
from .lower import compute_dtype

TL = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
      torch.float64: "tl.float64", torch.int64: "tl.int64", torch.int32: "tl.int32", torch.int16: "tl.int16",
      torch.int8: "tl.int8", torch.uint8: "tl.uint8", torch.bool: "tl.int1"}
NP = {torch.float32: "np.float32", torch.float64: "np.float64", torch.int64: "np.int64",
      torch.int32: "np.int32", torch.int16: "np.int16", torch.int8: "np.int8", torch.uint8: "np.uint8",
      torch.bool: "np.bool_"}


class Renderer:
    lang = ""

    def __init__(self):
        self.helpers: set[str] = set()

    def literal(self, c: Const) -> str:
        v = c.value
        if isinstance(v, bool) or c.dtype == torch.bool:
            return "True" if v else "False"
        if c.dtype.is_floating_point:
            v = float(v)
            if math.isnan(v):
                return self.nan()
            if math.isinf(v):
                return self.inf() if v > 0 else f"(-{self.inf()})"
            return repr(v)
        return str(int(v))

    def render(self, e) -> str:
        if isinstance(e, Ref):
            return e.name
        if isinstance(e, Const):
            return self.literal(e)
        args = [self.render(a) for a in e.args]
        fp = compute_dtype(e.dtype).is_floating_point
        if e.op == "cast":
            return self.cast(args[0], e.args[0], e.dtype)
        if e.op == "convert":
            return self.convert(args[0], e.args[0], e.dtype)
        fn = getattr(self, "op_" + e.op.rstrip("_"))
        return fn(*args, fp=fp, dt=e.dtype, e=e)

    # shared formulas --------------------------------------------------------------------
    def op_add(self, a, b, **k): return f"({a} + {b})"
    def op_sub(self, a, b, **k): return f"({a} - {b})"
    def op_mul(self, a, b, **k): return f"({a} * {b})"
    def op_neg(self, a, **k): return f"(-{a})"
    def op_eq(self, a, b, **k): return f"({a} == {b})"
    def op_ne(self, a, b, **k): return f"({a} != {b})"
    def op_lt(self, a, b, **k): return f"({a} < {b})"
    def op_le(self, a, b, **k): return f"({a} <= {b})"
    def op_gt(self, a, b, **k): return f"({a} > {b})"
    def op_ge(self, a, b, **k): return f"({a} >= {b})"
    def op_isnan(self, a, **k): return f"({a} != {a})"
    def op_reciprocal(self, a, **k): return f"(1.0 / {a})"
    def op_gelu(self, a, **k): return f"(0.5 * {a} * (1.0 + {self.fn('erf', f'({a} * 0.7071067811865476)')}))"
    def op_gelu_tanh(self, a, **k):
        inner = f"(0.7978845608028654 * ({a} + 0.044715 * {a} * {a} * {a}))"
        return f"(0.5 * {a} * (1.0 + {self.op_tanh(inner, fp=True)}))"
    def op_rsqrt(self, a, **k): return f"(1.0 / {self.fn('sqrt', a)})"
    def op_sigmoid(self, a, **k): return f"(1.0 / (1.0 + {self.fn('exp', f'(-{a})')}))"
    def op_tanh(self, a, **k): return f"(1.0 - 2.0 / ({self.fn('exp', f'(2.0 * {a})')} + 1.0))"
    def op_tan(self, a, **k): return f"({self.fn('sin', a)} / {self.fn('cos', a)})"
    def op_sinh(self, a, **k): return f"(0.5 * ({self.fn('exp', a)} - {self.fn('exp', f'(-{a})')}))"
    def op_cosh(self, a, **k): return f"(0.5 * ({self.fn('exp', a)} + {self.fn('exp', f'(-{a})')}))"
    def op_log10(self, a, **k): return f"({self.fn('log', a)} * 0.4342944819032518)"
    def op_exp2(self, a, **k): return f"{self.fn('exp', f'({a} * 0.6931471805599453)')}"
    def op_log2(self, a, **k): return f"({self.fn('log', a)} * 1.4426950408889634)"
    def op_truediv(self, a, b, **k): return f"({a} / {b})"
    def op_truediv_rn(self, a, b, **k): return self.op_truediv(a, b, **k)     # IEEE already but in Triton


def _reciprocal(x, dt):
    """A constant divisor's reciprocal in ``dt`` (reciprocal_of) when finite and nonzero, else None."""
    if not (isinstance(x, Const) and not isinstance(x.value, bool) and math.isfinite(float(x.value)) and x.value):
        return None
    r = reciprocal_of(float(x.value), dt)
    return r if math.isfinite(r) and r != 0 else None


def reciprocal_of(c: float, dt) -> float:
    """What eager's CUDA kernels divide by a scalar ``c`` with: ATen multiplies by its reciprocal,
    rounded in the op's math type (BinaryDivTrueKernel.cu, the trunc division's too, and the mean's
    factor). With kiln dividing exactly, (a / 7).floor() on integer-valued a differed from eager's
    on 8% of 65536 values on an H200; eager's CPU kernels divide (the numba renderer does)."""
    with np.errstate(over="ignore", divide="ignore"):
        return float(np.float32(1.0) / np.float32(c)) if dt != torch.float64 else 1.0 / c



class TritonRenderer(Renderer):
    lang = "triton"

    def nan(self): return "float('nan')"
    def inf(self): return "float('inf')"
    def fn(self, name, a): return f"tl.{name}({a})"

    # Triton 3.6 (the GPU machine's) compiles `-x` as `0 - x` (fixed upstream in May 2026), and older
    # versions make a constant 0.0 of either sign +0.0: -(+0.0) and a literal -0.0 came out +0.0 where
    # eager has -0.0 (floor division's -0.0 results on the GPU). Float negation is a multiply by -1,
    # and -0.0 a product made at run time.
    def literal(self, c: Const) -> str:
        if c.dtype.is_floating_point and not isinstance(c.value, bool) and float(c.value) == 0 \
                and math.copysign(1.0, float(c.value)) < 0:
            return f"(tl.full([], 0.0, {TL[compute_dtype(c.dtype)]}) * -1.0)"
        return super().literal(c)

    def op_neg(self, a, fp=True, **k): return f"({a} * -1.0)" if fp else f"(-{a})"

    def cast(self, s, src, dt):
        src_dt = src.dtype if not isinstance(src, Const) else None
        if src_dt is not None and compute_dtype(src_dt) == compute_dtype(dt):
            return s
        if isinstance(src, Const):
            return self.literal(Const(src.value, dt))
        if dt == torch.bool:
            return f"({s} != 0)"
        return f"{s}.to({TL[compute_dtype(dt)]})"

    def convert(self, s, src, dt):
        if isinstance(src, Const):
            return self.literal(Const(src.value, dt))
        if dt == torch.bool:
            return f"({s} != 0)"
        if dt in (torch.float16, torch.bfloat16):
            # from an integer through float32, as eager converts (c10's Half and BFloat16 are made
            # from a float): an int64 past 2**24 rounds twice there, and Triton's direct int64 ->
            # bfloat16 rounds once (its interpreter's gives garbage: 8 -> 7e-40)
            via = ".to(tl.float32)" if not src.dtype.is_floating_point else ""
            return f"{s}{via}.to({TL[dt]}).to(tl.float32)"
        return f"{s}.to({TL[dt]})"

    # Triton's fp32 `/` is div.full.f32 (within 2 ulp, as Inductor's kernels divide) and tl.sqrt is
    # sqrt.approx.ftz. A division that reaches a rounding op or a comparison (lower.exact_divisions:
    # floor(a / b) could land one below eager's) is IEEE (div.rn), sqrt is sqrt.rn, and a constant
    # divisor is a multiply by its reciprocal, as eager's CUDA kernels divide (reciprocal_of).
    def op_truediv(self, a, b, e=None, **k):
        dt = compute_dtype(e.dtype)
        return self.div(a, b, dt, _reciprocal(e.args[1], dt), exact=False)
    def op_truediv_rn(self, a, b, e=None, **k):
        dt = compute_dtype(e.dtype)
        return self.div(a, b, dt, _reciprocal(e.args[1], dt))
    @staticmethod
    def div(a, b, dt, recip=None, exact=True) -> str:
        """``a / b`` in compute dtype ``dt``; ``recip``: b's reciprocal when b is a constant."""
        if recip is not None:
            return f"({a} * {recip!r})"
        return f"tl.div_rn({a}, {b})" if exact and dt == torch.float32 else f"({a} / {b})"
    def op_exp(self, a, **k): return f"tl.exp({a})"
    def op_log(self, a, **k): return f"tl.log({a})"
    def op_sqrt(self, a, e=None, **k):
        return f"tl.sqrt_rn({a})" if compute_dtype(e.dtype) == torch.float32 else f"tl.sqrt({a})"
    def op_rsqrt(self, a, **k): return f"tl.rsqrt({a})"
    def op_sin(self, a, **k): return f"tl.sin({a})"
    def op_cos(self, a, **k): return f"tl.cos({a})"
    def op_erf(self, a, **k): return f"tl.erf({a})"
    def op_erfc(self, a, dt=None, **k):
        self.helpers.add("erfc")
        return f"_erfc({a})"
    def op_exp2(self, a, **k): return f"tl.exp2({a})"
    def op_log2(self, a, **k): return f"tl.log2({a})"
    def op_sigmoid(self, a, e=None, **k):
        if e is not None and e.dtype != torch.float64:
            self.helpers.add("libdevice")
            return f"_sigmoid({a})"
        return f"tl.sigmoid({a})"
    def op_floor(self, a, **k): return f"tl.floor({a})"
    def op_ceil(self, a, **k): return f"tl.ceil({a})"
    def op_trunc(self, a, **k): return f"tl.where({a} < 0, tl.ceil({a}), tl.floor({a}))"
    def op_abs(self, a, **k): return f"tl.abs({a})"
    def op_isinf(self, a, **k): return f"(tl.abs({a}) == float('inf'))"
    def op_expm1(self, a, **k):
        self.helpers.add("libdevice")
        return f"_expm1({a})"
    def op_tanh(self, a, **k):
        self.helpers.add("libdevice")
        return f"_tanh({a})"
    def op_sinh(self, a, **k):                  # from expm1: exp(a) - exp(-a) cancels for small a
        self.helpers.add("libdevice")
        return f"(0.5 * (_expm1({a}) - _expm1(-{a})))"
    def op_log1p(self, a, **k):
        self.helpers.add("libdevice")
        return f"_log1p({a})"
    def op_where(self, c, a, b, **k): return f"tl.where({c}, {a}, {b})"
    def op_relu(self, a, **k): return f"tl.where({a} < 0, 0, {a})"
    def op_sign(self, a, fp=True, **k):         # sign(NaN) = 0, as eager computes it
        s = f"(tl.where({a} > 0, 1, 0) - tl.where({a} < 0, 1, 0))"
        return f"{s}.to({a}.dtype)" if fp else s
    def op_maximum(self, a, b, **k): return f"tl.where(({a} > {b}) | ({a} != {a}), {a}, {b})"
    def op_minimum(self, a, b, **k): return f"tl.where(({a} < {b}) | ({a} != {a}), {a}, {b})"
    def op_land(self, a, b, **k): return f"({a} & {b})"
    def op_lor(self, a, b, **k): return f"({a} | {b})"
    def op_lxor(self, a, b, **k): return f"({a} ^ {b})"
    def op_lnot(self, a, **k): return f"({a} == 0)"
    def op_and(self, a, b, **k): return f"({a} & {b})"
    def op_or(self, a, b, **k): return f"({a} | {b})"
    def op_xor(self, a, b, **k): return f"({a} ^ {b})"
    def op_not(self, a, dt=None, **k): return f"({a} == 0)" if dt == torch.bool else f"(~{a})"
    def op_round(self, a, **k):
        self.helpers.add("rint")
        return f"_rint({a})"
    def op_pow(self, a, b, fp=True, e=None, **k):
        rhs = e.args[1]
        if isinstance(rhs, Const) and float(rhs.value) in (1.0, 2.0, 3.0, 0.5, -1.0, -0.5, 0.0):
            v = float(rhs.value)
            return {1.0: a, 2.0: f"({a} * {a})", 3.0: f"({a} * {a} * {a})", 0.5: self.op_sqrt(a, e=e),
                    -1.0: f"(1.0 / {a})", -0.5: f"tl.rsqrt({a})",
                    0.0: f"tl.where({a} == {a}, 1, 1).to({a}.dtype)"}[v]       # 1 for NaN and inf too
        if not fp:
            self.helpers.add("ipow")
            return f"_ipow({a}, {b})"
        if isinstance(rhs, Const):
            v = float(rhs.value)
            if v.is_integer() and abs(v) <= 8:      # exact repeated products, any sign of the base
                prod = " * ".join([f"{a}"] * int(abs(v)))
                return f"({prod})" if v > 0 else f"(1.0 / ({prod}))"
            # a constant fractional exponent: negative bases give NaN, as in eager
            return f"tl.where({a} < 0, float('nan'), tl.exp2({b} * tl.log2({a})))"
        self.helpers.add("pow")
        return f"_pow({a}, {b})"
    def _idiv(self, a, b, mode, e):
        self.helpers.add("idiv")
        return f"_idiv_{mode}({', '.join(self._typed(a, b, e))})"
    def op_floordiv(self, a, b, fp=True, e=None, **k):
        return self._fmod("_fdiv_floor", a, b, e) if fp else self._idiv(a, b, "floor", e)
    def op_truncdiv(self, a, b, fp=True, e=None, **k):
        return self.op_trunc(self.op_truediv_rn(a, b, e=e)) if fp else self._idiv(a, b, "trunc", e)
    # float fmod / remainder are exact (libdevice's fmod), as eager's: a - trunc(a / b) * b was off
    # by whole multiples of b once a / b lost its integer part to rounding
    def op_mod(self, a, b, fp=True, e=None, **k):
        return self._fmod("_fmod_floor", a, b, e) if fp else self._idiv(a, b, "mod", e)
    def op_fmod(self, a, b, fp=True, e=None, **k):
        return self._fmod("_fmod", a, b, e) if fp else self._idiv(a, b, "fmod", e)
    def _fmod(self, fn, a, b, e):
        self.helpers.add("libdevice")
        return f"{fn}({', '.join(self._typed(a, b, e))})"
    def _typed(self, a, b, e):
        """A constant operand of a helper becomes a scalar of the op's dtype: a literal passed to
        a helper is fp32 or int32, libdevice's fmod has no (fp64, fp32) form, and Triton refuses
        // and % between uint8 and int32."""
        dt = TL[compute_dtype(e.dtype)]
        return [f"tl.full([], {s}, {dt})" if isinstance(x, Const) else s for s, x in zip((a, b), e.args)]


class NumbaRenderer(Renderer):
    """numba source. Every value stays in its compute dtype: each op's result is wrapped in its
    numpy type and float constants are typed too (a bare Python float is float64 in numba, and
    ``x * 0.5`` on a float32 ``x`` would be computed in float64 and narrowed). exp, expm1, log,
    log1p, tanh (fp32 and fp64) and erf (fp32) call vectorisable helpers (codegen/numba_math.py;
    recorded in ``self.helpers``) instead of scalar libm calls that keep LLVM from vectorising
    the loop; sigmoid, gelu, exp2 are built on them."""
    lang = "numba"

    def nan(self): return "math.nan"
    def inf(self): return "math.inf"
    def fn(self, name, a): return f"math.{name}({a})"

    def literal(self, c: Const) -> str:
        s = super().literal(c)
        if c.dtype.is_floating_point and not isinstance(c.value, bool) and compute_dtype(c.dtype) == torch.float32:
            return f"np.float32({s})"
        return s

    def k(self, v, dt) -> str:
        """A float constant in ``dt``'s compute type."""
        return self.literal(Const(float(v), dt if dt is not None and dt.is_floating_point else torch.float64))

    @staticmethod
    def f32(dt) -> bool:
        return dt is not None and compute_dtype(dt) == torch.float32

    def render(self, e) -> str:
        s = super().render(e)
        if isinstance(e, E) and e.op not in ("cast", "convert") and compute_dtype(e.dtype) in NP:
            return f"{NP[compute_dtype(e.dtype)]}({s})"       # keep every value in its compute dtype
        return s

    # transcendental functions: vectorisable helpers (codegen/numba_math.py) in fp32 and fp64
    def _helper(self, name, a, dt):
        from .numba_math import EXPORTS     # numba only where numba kernels are rendered
        bits = {torch.float32: "32", torch.float64: "64"}.get(compute_dtype(dt)) if dt is not None else None
        if bits is None or f"{name}{bits}" not in EXPORTS:
            return None
        self.helpers.add(f"{name}{bits}")
        return f"{EXPORTS[f'{name}{bits}'][0]}({a})"

    def op_exp(self, a, dt=None, **k): return self._helper("exp", a, dt) or f"math.exp({a})"
    def op_expm1(self, a, dt=None, **k): return self._helper("expm1_", a, dt) or f"math.expm1({a})"
    def op_log(self, a, dt=None, **k): return self._helper("log", a, dt) or f"math.log({a})"
    def op_log1p(self, a, dt=None, **k): return self._helper("log1p", a, dt) or f"math.log1p({a})"
    def op_erf(self, a, dt=None, **k): return self._helper("erf", a, dt) or f"math.erf({a})"
    def op_erfc(self, a, dt=None, **k):        # 1 - erf: the same bits as the sum it replaces
        return f"({self.k(1.0, dt)} - {self.op_erf(a, dt=dt)})"
    def op_tanh(self, a, dt=None, **k): return self._helper("tanh", a, dt) or f"math.tanh({a})"

    def op_sigmoid(self, a, dt=None, **k):
        one = self.k(1.0, dt)
        return f"({one} / ({one} + {self.op_exp(f'(-{a})', dt=dt)}))"

    def op_gelu(self, a, dt=None, **k):
        erf = self.op_erf(f"({a} * {self.k(0.7071067811865476, dt)})", dt=dt)
        return f"({self.k(0.5, dt)} * {a} * ({self.k(1.0, dt)} + {erf}))"

    def op_gelu_tanh(self, a, dt=None, **k):
        inner = f"({self.k(0.7978845608028654, dt)} * ({a} + {self.k(0.044715, dt)} * {a} * {a} * {a}))"
        return f"({self.k(0.5, dt)} * {a} * ({self.k(1.0, dt)} + {self.op_tanh(inner, dt=dt)}))"

    def op_reciprocal(self, a, dt=None, **k): return f"({self.k(1.0, dt)} / {a})"
    def op_rsqrt(self, a, dt=None, **k):
        # a helper compiled without 'arcp': under it LLVM turns 1/sqrt into a reciprocal-sqrt
        # estimate plus a Newton step, which gives NaN at 0 and inf and is 1 ulp off elsewhere
        name = "rsqrt32" if self.f32(dt) else "rsqrt64"
        self.helpers.add(name)
        return f"_{name}({a})"
    def op_tan(self, a, **k): return f"math.tan({a})"
    def op_sinh(self, a, **k): return f"math.sinh({a})"
    def op_cosh(self, a, **k): return f"math.cosh({a})"
    def op_log10(self, a, **k): return f"math.log10({a})"
    def op_log2(self, a, **k): return f"math.log2({a})"
    def op_exp2(self, a, dt=None, **k): return self.op_exp(f"({a} * {self.k(0.6931471805599453, dt)})", dt=dt)

    def cast(self, s, src, dt):
        if isinstance(src, Const):
            return self.literal(Const(src.value, dt))
        return f"{NP[compute_dtype(dt)]}({s})" if dt != torch.bool else f"({s} != 0)"

    def convert(self, s, src, dt):
        return self.cast(s, src, dt)

    def op_sqrt(self, a, **k): return f"math.sqrt({a})"
    def op_sin(self, a, **k): return f"math.sin({a})"
    def op_cos(self, a, **k): return f"math.cos({a})"
    def op_floor(self, a, **k): return f"np.floor({a})"
    def op_ceil(self, a, **k): return f"np.ceil({a})"
    def op_trunc(self, a, **k): return f"np.trunc({a})"
    def op_round(self, a, **k): return f"np.rint({a})"
    def op_abs(self, a, **k): return f"abs({a})"
    def op_isinf(self, a, **k): return f"math.isinf({a})"
    def op_where(self, c, a, b, **k): return f"({a} if {c} else {b})"
    def op_relu(self, a, fp=True, dt=None, **k):
        z = self.k(0.0, dt) if fp else "0"
        return f"({z} if {a} < {z} else {a})"

    def op_sign(self, a, fp=True, dt=None, **k):
        if not fp:
            return f"(1 if {a} > 0 else (-1 if {a} < 0 else 0))"
        one, z = self.k(1.0, dt), self.k(0.0, dt)        # sign(NaN) = 0, as eager computes it
        return f"({one} if {a} > {z} else (-{one} if {a} < {z} else {z}))"

    def op_maximum(self, a, b, **k): return f"({a} if ({a} > {b} or {a} != {a}) else {b})"
    def op_minimum(self, a, b, **k): return f"({a} if ({a} < {b} or {a} != {a}) else {b})"
    def op_land(self, a, b, **k): return f"({a} and {b})"
    def op_lor(self, a, b, **k): return f"({a} or {b})"
    def op_lxor(self, a, b, **k): return f"({a} != {b})"
    def op_lnot(self, a, **k): return f"(not {a})"
    def op_and(self, a, b, **k): return f"({a} & {b})"
    def op_or(self, a, b, **k): return f"({a} | {b})"
    def op_xor(self, a, b, **k): return f"({a} ^ {b})"
    def op_not(self, a, dt=None, **k): return f"(not {a})" if dt == torch.bool else f"(~{a})"
    def op_pow(self, a, b, fp=True, e=None, dt=None, **k):
        rhs = e.args[1]
        if isinstance(rhs, Const) and float(rhs.value) in (1.0, 2.0, 3.0):
            return {1.0: a, 2.0: f"({a} * {a})", 3.0: f"({a} * {a} * {a})"}[float(rhs.value)]
        if fp and isinstance(rhs, Const) and float(rhs.value) in (0.5, -0.5, -1.0):
            v = float(rhs.value)
            return {0.5: f"math.sqrt({a})", -0.5: self.op_rsqrt(a, dt=dt), -1.0: self.op_reciprocal(a, dt=dt)}[v]
        return f"({a} ** {b})"
    def op_floordiv(self, a, b, fp=True, e=None, **k):
        if fp:
            self.helpers.add("fmod")
            return f"_fdiv_floor({a}, {b}, {self.k(1.0, e.dtype)})"
        return f"_idiv_floor({a}, {b})"
    def op_truncdiv(self, a, b, fp=True, **k):
        return f"np.trunc({a} / {b})" if fp else f"_idiv_trunc({a}, {b})"
    def op_mod(self, a, b, fp=True, **k):
        if fp:
            self.helpers.add("fmod")
            return f"_fmod_floor({a}, {b})"
        return f"_idiv_mod({a}, {b})"
    def op_fmod(self, a, b, fp=True, **k):
        return f"np.fmod({a}, {b})" if fp else f"_idiv_fmod({a}, {b})"       # numba has no math.fmod


CU = {torch.float32: "float", torch.float64: "double", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16",
      torch.int64: "long long", torch.int32: "int", torch.int16: "short", torch.int8: "signed char",
      torch.uint8: "unsigned char", torch.bool: "bool"}


class CudaRenderer(Renderer):
    """CUDA C++: float math through the single-precision intrinsics' names (expf ...) for fp32
    and the double ones for fp64; 16-bit floats are widened on load and narrowed on store."""
    lang = "cuda"

    def nan(self): return "__int_as_float(0x7fc00000)"
    def inf(self): return "__int_as_float(0x7f800000)"

    def fn(self, name, a, dt=None):
        return f"{name}f({a})" if compute_dtype(dt or torch.float32) != torch.float64 else f"{name}({a})"

    def render(self, e) -> str:
        s = super().render(e)
        if isinstance(e, E) and e.op not in ("cast", "convert"):
            return f"(({CU[compute_dtype(e.dtype)]})({s}))"
        return s

    def literal(self, c: Const) -> str:
        if isinstance(c.value, bool) or c.dtype == torch.bool:
            return "true" if c.value else "false"
        s = super().literal(c)
        if c.dtype == torch.float32 and s[-1].isdigit() and "__int_as_float" not in s:
            return f"{s}f" if ("." in s or "e" in s) else f"{s}.0f"
        if c.dtype in (torch.int64,) and s.lstrip("-").isdigit():
            return f"{s}LL"
        return s

    def cast(self, s, src, dt):
        if isinstance(src, Const):
            return self.literal(Const(src.value, dt))
        return f"(({s}) != 0)" if dt == torch.bool else f"(({CU[compute_dtype(dt)]})({s}))"

    def op_truediv(self, a, b, e=None, **k):       # a constant divisor as eager's CUDA kernels: a multiply
        dt = compute_dtype(e.dtype)
        r = _reciprocal(e.args[1], dt)
        return f"(({a}) * {self.literal(Const(r, dt))})" if r is not None else f"(({a}) / ({b}))"

    def convert(self, s, src, dt):
        if isinstance(src, Const):
            return self.literal(Const(src.value, dt))
        if dt == torch.bool:
            return f"(({s}) != 0)"
        if dt == torch.bfloat16:
            return f"__bfloat162float(__float2bfloat16((float)({s})))"
        if dt == torch.float16:
            return f"__half2float(__float2half((float)({s})))"
        return f"(({CU[dt]})({s}))"

    def _f(self, name, a, e):
        return self.fn(name, a, e.dtype if e is not None else None)

    def op_exp(self, a, e=None, **k): return self._f("exp", a, e)
    def op_log(self, a, e=None, **k): return self._f("log", a, e)
    def op_sqrt(self, a, e=None, **k): return self._f("sqrt", a, e)
    def op_rsqrt(self, a, e=None, **k): return self._f("rsqrt", a, e)
    def op_sin(self, a, e=None, **k): return self._f("sin", a, e)
    def op_cos(self, a, e=None, **k): return self._f("cos", a, e)
    def op_tan(self, a, e=None, **k): return self._f("tan", a, e)
    def op_erf(self, a, e=None, **k): return self._f("erf", a, e)
    def op_erfc(self, a, e=None, **k): return self._f("erfc", a, e)
    def op_tanh(self, a, e=None, **k): return self._f("tanh", a, e)
    def op_sinh(self, a, e=None, **k): return self._f("sinh", a, e)
    def op_cosh(self, a, e=None, **k): return self._f("cosh", a, e)
    def op_exp2(self, a, e=None, **k): return self._f("exp2", a, e)
    def op_log2(self, a, e=None, **k): return self._f("log2", a, e)
    def op_log10(self, a, e=None, **k): return self._f("log10", a, e)
    def op_expm1(self, a, e=None, **k): return self._f("expm1", a, e)
    def op_log1p(self, a, e=None, **k): return self._f("log1p", a, e)
    def op_floor(self, a, e=None, **k): return self._f("floor", a, e)
    def op_ceil(self, a, e=None, **k): return self._f("ceil", a, e)
    def op_trunc(self, a, e=None, **k): return self._f("trunc", a, e)
    def op_round(self, a, e=None, **k): return self._f("rint", a, e)
    def op_sigmoid(self, a, e=None, **k): return f"(1.0f / (1.0f + {self._f('exp', f'(-{a})', e)}))"
    def op_abs(self, a, fp=True, e=None, **k): return self._f("fabs", a, e) if fp else f"(({a}) < 0 ? -({a}) : ({a}))"
    def op_isinf(self, a, **k): return f"isinf({a})"
    def op_isnan(self, a, **k): return f"isnan({a})"
    def op_where(self, c, a, b, **k): return f"(({c}) ? ({a}) : ({b}))"
    def op_relu(self, a, **k): return f"(({a}) < 0 ? 0 : ({a}))"
    def op_sign(self, a, fp=True, **k):         # sign(NaN) = 0, as eager computes it
        return f"((({a}) > 0) - (({a}) < 0))"
    def op_maximum(self, a, b, **k): return f"((({a}) > ({b}) || ({a}) != ({a})) ? ({a}) : ({b}))"
    def op_minimum(self, a, b, **k): return f"((({a}) < ({b}) || ({a}) != ({a})) ? ({a}) : ({b}))"
    def op_land(self, a, b, **k): return f"(({a}) && ({b}))"
    def op_lor(self, a, b, **k): return f"(({a}) || ({b}))"
    def op_lxor(self, a, b, **k): return f"(({a}) != ({b}))"
    def op_lnot(self, a, **k): return f"(!({a}))"
    def op_and(self, a, b, **k): return f"(({a}) & ({b}))"
    def op_or(self, a, b, **k): return f"(({a}) | ({b}))"
    def op_xor(self, a, b, **k): return f"(({a}) ^ ({b}))"
    def op_not(self, a, dt=None, **k): return f"(!({a}))" if dt == torch.bool else f"(~({a}))"
    def op_pow(self, a, b, fp=True, e=None, **k):
        rhs = e.args[1]
        if isinstance(rhs, Const) and float(rhs.value) == 2.0:
            return f"(({a}) * ({a}))"
        if fp and isinstance(rhs, Const) and float(rhs.value) in (0.5, -0.5, 3.0, -1.0, -2.0):
            # as ATen's pow by these scalars (sqrt, not powf: sqrt(-0.0) is -0.0, sqrt(-inf) NaN)
            one = self.literal(Const(1.0, compute_dtype(e.dtype)))
            return {0.5: self._f("sqrt", a, e), -0.5: self._f("rsqrt", a, e), 3.0: f"(({a}) * ({a}) * ({a}))",
                    -1.0: f"({one} / ({a}))", -2.0: f"({one} / (({a}) * ({a})))"}[float(rhs.value)]
        return f"{self.fn('pow', f'{a}, {b}', e.dtype)}" if fp else f"kiln_ipow({a}, {b})"
    def op_floordiv(self, a, b, fp=True, e=None, **k):
        return f"kiln_fdiv_floor({a}, {b})" if fp else f"kiln_idiv_floor({a}, {b})"
    def op_truncdiv(self, a, b, fp=True, e=None, **k):
        return self._f("trunc", self.op_truediv(a, b, e=e), e) if fp else f"(({a}) / ({b}))"
    def op_mod(self, a, b, fp=True, e=None, **k):
        return f"kiln_fmod_floor({a}, {b})" if fp else f"kiln_imod({a}, {b})"
    def op_fmod(self, a, b, fp=True, e=None, **k):
        return self.fn("fmod", f"{a}, {b}", e.dtype) if fp else f"(({a}) % ({b}))"

"""Scalar semantics of pointwise and reduction ops: each supported ATen op becomes a small typed
expression tree over scalar operations (add, exp, where, cast ...). Fusion uses this table to
know what it may put in a kernel; every code generator renders the same scalar operations, so
one table, not one per backend, says what an op means."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .graph import Node, Value


class NotLowerable(Exception):
    """The op (or this use of it: dtype, kwargs) has no scalar form; it runs through ATen."""


@dataclass(frozen=True)
class Ref:
    name: str
    dtype: torch.dtype


@dataclass(frozen=True)
class Const:
    value: Any
    dtype: torch.dtype


@dataclass(frozen=True)
class E:
    op: str
    args: tuple
    dtype: torch.dtype


FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
SUPPORTED_DTYPES = FLOATS + INTS + (torch.bool,)


def _operand(x, like: torch.dtype):
    if isinstance(x, Value):
        if x.type is None or x.type.dtype not in SUPPORTED_DTYPES:
            raise NotLowerable(f"operand {x} has unsupported type")
        return Ref(x.name, x.type.dtype)
    if isinstance(x, bool):
        return Const(x, torch.bool)
    if isinstance(x, int):
        return Const(x, torch.int64)
    if isinstance(x, float):
        return Const(x, torch.float64 if like not in FLOATS else like)
    raise NotLowerable(f"operand {x!r}")


def cast(x, dt: torch.dtype):
    """Implicit promotion: the value is computed in ``dt``'s compute type (no rounding), except an
    integer tensor promoted to a 16-bit float, which eager rounds to it first (TensorIterator casts
    the operand to the common dtype: int64 259 + bf16 0.75 is 260.75 there, not 259.75). A Python
    scalar stays unrounded, as eager keeps it in the op's compute type."""
    if isinstance(x, Const):
        v = x.value
        v = bool(v) if dt == torch.bool else float(v) if dt.is_floating_point else int(v)
        return Const(v, dt)
    if x.dtype != dt and dt in (torch.float16, torch.bfloat16) and not x.dtype.is_floating_point:
        return convert(x, dt)
    return x if x.dtype == dt else E("cast", (x,), dt)


def convert(x, dt: torch.dtype):
    """Explicit conversion (to/_to_copy): rounds to ``dt`` exactly as eager does."""
    return x if x.dtype == dt else E("convert", (x,), dt)


def _promoted(*xs) -> torch.dtype:
    metas = [torch.empty((), dtype=x.dtype) if isinstance(x, Ref) else x.value for x in xs]
    return torch.result_type(*metas) if len(metas) > 1 else xs[0].dtype


_TABLE: dict[str, Callable] = {}


def _reg(*names):
    def deco(fn):
        for n in names:
            _TABLE[n] = fn
        return fn
    return deco


def _binary(sop):
    def f(out, a, b, **kw):
        return E(sop, (cast(a, out), cast(b, out)), out)
    return f


def _unary(sop, float_only=False):
    def f(out, a, **kw):
        if float_only and out not in FLOATS:
            raise NotLowerable(f"{sop} on {out}")
        return E(sop, (cast(a, out),), out)
    return f


def _cmp(sop):
    def f(out, a, b, **kw):
        p = _promoted(a, b)
        return E(sop, (cast(a, p), cast(b, p)), torch.bool)
    return f


for _n, _s in [("add", "add"), ("sub", "sub"), ("mul", "mul"), ("maximum", "maximum"), ("minimum", "minimum"),
               ("pow", "pow"), ("fmod", "fmod"), ("remainder", "mod"),
               ("bitwise_and", "and_"), ("bitwise_or", "or_"), ("bitwise_xor", "xor")]:
    for _ov in ("Tensor", "Scalar", "default", "Tensor_Tensor", "Tensor_Scalar", "Scalar_Tensor", "Scalar_Tensor"):
        _TABLE[f"aten.{_n}.{_ov}"] = _binary(_s)
for _n, _s in [("eq", "eq"), ("ne", "ne"), ("lt", "lt"), ("le", "le"), ("gt", "gt"), ("ge", "ge")]:
    for _ov in ("Tensor", "Scalar"):
        _TABLE[f"aten.{_n}.{_ov}"] = _cmp(_s)
for _n in ["exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "sin", "cos", "tan",
           "sinh", "cosh", "tanh", "sigmoid", "erf", "floor", "ceil", "trunc",
           "round", "reciprocal"]:
    _TABLE[f"aten.{_n}.default"] = _unary(_n, float_only=True)
for _n in ["neg", "abs", "sign", "relu"]:
    _TABLE[f"aten.{_n}.default"] = _unary(_n)
_TABLE["aten.bitwise_not.default"] = _unary("not_")


@_reg("aten.add.Tensor", "aten.add.Scalar", "aten.sub.Tensor", "aten.sub.Scalar")
def _add_sub(out, a, b, alpha=1, _op="add", **kw):
    if out == torch.bool and _op == "add":      # bool + bool is a logical or (1-bit ints wrapped: 1 + 1 = 0)
        return E("lor", (cast(a, out), cast(b, out)), out)
    b = cast(b, out)
    if alpha != 1:
        b = E("mul", (b, cast(Const(alpha, torch.float64 if isinstance(alpha, float) else torch.int64), out)), out)
    return E(_op, (cast(a, out), b), out)


_TABLE["aten.sub.Tensor"] = lambda out, a, b, alpha=1, **kw: _add_sub(out, a, b, alpha, "sub")
_TABLE["aten.sub.Scalar"] = _TABLE["aten.sub.Tensor"]


@_reg("aten.div.Tensor", "aten.div.Scalar", "aten.div.Tensor_mode", "aten.div.Scalar_mode")
def _div(out, a, b, rounding_mode=None, **kw):
    if rounding_mode is None:
        return E("truediv", (cast(a, out), cast(b, out)), out)
    sop = {"floor": "floordiv", "trunc": "truncdiv"}[rounding_mode]
    return E(sop, (cast(a, out), cast(b, out)), out)


@_reg("aten.where.self", "aten.where.ScalarSelf", "aten.where.ScalarOther", "aten.where.Scalar")
def _where(out, c, a, b, **kw):
    return E("where", (cast(c, torch.bool), cast(a, out), cast(b, out)), out)


@_reg("aten.logical_not.default")
def _lnot(out, a, **kw):
    return E("lnot", (cast(a, torch.bool),), torch.bool)


for _n, _s in [("logical_and", "land"), ("logical_or", "lor"), ("logical_xor", "lxor")]:
    _TABLE[f"aten.{_n}.default"] = (lambda s: lambda out, a, b, **kw: E(s, (cast(a, torch.bool), cast(b, torch.bool)), torch.bool))(_s)


@_reg("aten.isnan.default", "aten.isinf.default")
def _isx(out, a, _=None, **kw):
    return E("isnan", (a,), torch.bool)


_TABLE["aten.isinf.default"] = lambda out, a, **kw: E("isinf", (a,), torch.bool)
_TABLE["aten.isnan.default"] = lambda out, a, **kw: E("isnan", (a,), torch.bool)


@_reg("aten.clamp.default", "aten.clamp.Tensor")
def _clamp(out, a, min=None, max=None, **kw):
    x = cast(a, out)
    if min is not None:
        x = E("maximum", (x, cast(min, out)), out)
    if max is not None:
        x = E("minimum", (x, cast(max, out)), out)
    return x


@_reg("aten._to_copy.default", "prims.convert_element_type.default", "aten.clone.default",
      "aten.copy.default", "aten.lift_fresh_copy.default", "aten.alias.default")
def _copy(out, a, *rest, **kw):
    if kw.get("device") is not None and str(kw["device"]) not in ("cpu",) and not str(kw["device"]).startswith("cuda"):
        raise NotLowerable("device copy")
    src = rest[0] if rest and isinstance(rest[0], (Ref, E)) else a     # aten.copy(dst, src)
    return convert(src, out)


@_reg("aten.gelu.default")
def _gelu(out, a, approximate="none", **kw):
    return E("gelu_tanh" if approximate == "tanh" else "gelu", (cast(a, out),), out)


@_reg("aten.silu.default")
def _silu(out, a, **kw):
    x = cast(a, out)
    return E("mul", (x, E("sigmoid", (x,), out)), out)


# ops whose every element is one constant: op -> index of the fill value in args (None: fixed)
FILLS = {"aten.full.default": (1, None), "aten.full_like.default": (1, None),
         "aten.scalar_tensor.default": (0, None), "aten.zeros_like.default": (None, 0),
         "aten.ones_like.default": (None, 1), "aten.zeros.default": (None, 0), "aten.ones.default": (None, 1)}


def _fill(node: Node, out: torch.dtype) -> Const:
    idx, fixed = FILLS[node.op]
    v = fixed if idx is None else (node.args[idx] if len(node.args) > idx else node.kwargs.get("fill_value"))
    if not isinstance(v, (bool, int, float)):
        raise NotLowerable(f"{node.op} fill value {v!r}")
    try:
        return cast(Const(v, torch.bool if isinstance(v, bool) else torch.int64 if isinstance(v, int)
                          else torch.float64), out)
    except (OverflowError, ValueError) as e:         # inf/nan into an integer dtype
        raise NotLowerable(f"{node.op}: {e}") from None


def lower_pointwise(node: Node):
    """The expression tree computing ``node``'s single output from Refs and Consts."""
    if node.op in FILLS:
        if len(node.outputs) != 1 or node.out.type is None or node.out.type.dtype not in SUPPORTED_DTYPES:
            raise NotLowerable(node.op)
        return _fill(node, node.out.type.dtype)
    fn = _TABLE.get(node.op)
    if fn is None:
        raise NotLowerable(f"no scalar form for {node.op}")
    if len(node.outputs) != 1 or node.out.type is None:
        raise NotLowerable("multi-output")
    out = node.out.type.dtype
    if out not in SUPPORTED_DTYPES:
        raise NotLowerable(f"dtype {out}")
    if node.op in ("aten.clamp.default", "aten.clamp.Tensor"):     # min / max: None, scalar or tensor
        a = node.args
        lo = a[1] if len(a) > 1 else node.kwargs.get("min")
        hi = a[2] if len(a) > 2 else node.kwargs.get("max")
        return fn(out, _operand(a[0], out), min=None if lo is None else _operand(lo, out),
                  max=None if hi is None else _operand(hi, out))
    args = [_operand(a, out) for a in node.args]
    kw = {k: v for k, v in node.kwargs.items()
          if k not in ("dtype", "layout", "device", "pin_memory", "memory_format", "non_blocking")}
    kw = {k: (_operand(v, out) if isinstance(v, Value) else v) for k, v in kw.items()}
    return fn(out, *args, **kw)


REDUCTION_OPS = {
    "aten.sum.dim_IntList": "sum", "aten.sum.default": "sum", "aten.mean.dim": "mean",
    "aten.mean.default": "mean", "aten.amax.default": "max", "aten.amin.default": "min",
    "aten.max.default": "max", "aten.min.default": "min", "aten.prod.dim_int": "prod",
    "aten.prod.default": "prod", "aten.any.dim": "any", "aten.any.dims": "any", "aten.any.default": "any",
    "aten.all.dim": "all", "aten.all.dims": "all", "aten.all.default": "all",
}


def reduction_spec(node: Node) -> tuple[str, Value, tuple[int, ...], bool]:
    """(combine op, input, reduced dims (normalised, sorted), keepdim) of a reduction node."""
    kind = REDUCTION_OPS.get(node.op)
    if kind is None or not isinstance(node.args[0], Value) or node.args[0].type is None:
        raise NotLowerable(node.op)
    x = node.args[0]
    if x.type.dtype not in SUPPORTED_DTYPES or node.out.type.dtype not in SUPPORTED_DTYPES:
        raise NotLowerable("dtype")
    rank = x.type.rank
    dims: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    if node.op.endswith(".default") and kind in ("sum", "mean", "prod", "any", "all", "max", "min") \
            and node.op not in ("aten.amax.default", "aten.amin.default"):
        dims, keep = None, False
    if isinstance(dims, int):
        dims = [dims]
    if dims is None or len(dims) == 0:
        dims = list(range(rank))
    norm = tuple(sorted({d % rank for d in dims})) if rank else ()
    return kind, x, norm, keep


def neutral(kind: str, dtype: torch.dtype):
    if kind in ("sum", "mean", "any"):
        return 0
    if kind in ("prod", "all"):
        return 1
    big = math.inf if dtype.is_floating_point else (True if dtype == torch.bool else torch.iinfo(dtype).max)
    small = -math.inf if dtype.is_floating_point else (False if dtype == torch.bool else torch.iinfo(dtype).min)
    return small if kind == "max" else big


def is_lowerable(node: Node) -> bool:
    try:
        if node.op in REDUCTION_OPS:
            reduction_spec(node)
        else:
            lower_pointwise(node)
        return True
    except (NotLowerable, KeyError, TypeError, IndexError):
        return False

"""The op registry: one place that says, for every op name, its kind, how to infer its output
types and how to run it (the reference implementation is the ATen overload itself)."""
from __future__ import annotations

import dataclasses
import functools
from enum import Enum
from typing import Any

import torch

from .graph import Node, Value, iter_values, map_values
from .types import TensorType


class OpKind(str, Enum):
    POINTWISE = "pointwise"
    REDUCTION = "reduction"
    VIEW = "view"
    MATMUL = "matmul"
    OPAQUE = "opaque"


REDUCTIONS = {"aten.sum.dim_IntList", "aten.sum.default", "aten.mean.dim", "aten.mean.default",
              "aten.amax.default", "aten.amin.default", "aten.prod.dim_int", "aten.prod.default",
              "aten.any.dim", "aten.any.dims", "aten.any.default", "aten.all.dim", "aten.all.dims",
              "aten.all.default", "aten.max.default", "aten.min.default"}
VIEWS = {"aten.view.default", "aten._unsafe_view.default", "aten.permute.default",
         "aten.expand.default", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims",
         "aten.squeeze.default", "aten.slice.Tensor", "aten.select.int", "aten.alias.default",
         "aten.t.default", "aten.transpose.int", "aten.as_strided.default", "aten.diagonal.default",
         "aten.reshape.default", "aten.unfold.default", "aten.narrow.default", "aten.detach.default"}
MATMULS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default",
           "aten.matmul.default", "aten.linear.default", "aten.convolution.default",
           "aten._scaled_dot_product_flash_attention.default",
           "aten._scaled_dot_product_efficient_attention.default",
           "aten._scaled_dot_product_flash_attention_for_cpu.default"}
# Pointwise ops that are not tagged pointwise in ATen, or whose tag we should not trust.
EXTRA_POINTWISE = {"aten._to_copy.default", "aten.clone.default", "prims.convert_element_type.default",
                   "aten.where.self", "aten.scalar_tensor.default", "aten.copy.default",
                   "aten.lift_fresh_copy.default", "aten.full.default", "aten.full_like.default",
                   "aten.zeros_like.default", "aten.ones_like.default"}
NOT_POINTWISE = {"aten.bernoulli.p", "aten.rand_like.default", "aten.randn_like.default",
                 "aten.native_dropout.default"}


@functools.lru_cache(maxsize=None)
def resolve(name: str):
    """'aten.add.Tensor' -> torch.ops.aten.add.Tensor (any namespace, custom ops included)."""
    ns, rest = name.split(".", 1)
    opname, overload = rest.rsplit(".", 1) if "." in rest else (rest, "default")
    try:
        return getattr(getattr(getattr(torch.ops, ns), opname), overload)
    except (AttributeError, RuntimeError) as e:
        raise KeyError(f"unknown op {name!r}") from e


def op_name(target) -> str:
    """Name of an OpOverload as the IR spells it."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[1]}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return op_name(target.default)
    raise TypeError(f"not an ATen op: {target!r}")


@functools.lru_cache(maxsize=None)
def op_kind(name: str) -> OpKind:
    if name in REDUCTIONS:
        return OpKind.REDUCTION
    if name in VIEWS:
        return OpKind.VIEW
    if name in MATMULS:
        return OpKind.MATMUL
    if name in NOT_POINTWISE:
        return OpKind.OPAQUE
    if name in EXTRA_POINTWISE:
        return OpKind.POINTWISE
    try:
        op = resolve(name)
    except KeyError:
        return OpKind.OPAQUE
    if torch.Tag.pointwise in getattr(op, "tags", ()) and not op._schema.is_mutable:
        return OpKind.POINTWISE
    return OpKind.OPAQUE


def is_known(name: str) -> bool:
    try:
        resolve(name)
        return True
    except KeyError:
        return False


def _to_meta(v: Value):
    return v.type.meta() if isinstance(v.type, TensorType) else v


def _device_of(args: tuple, kwargs: dict) -> str:
    """Where an op's outputs live: its ``device`` keyword (a copy to another device, a factory),
    else its tensor operands' device (a 0-d operand elsewhere is a CPU scalar and does not
    count), else the CPU."""
    dev = kwargs.get("device")
    if dev is not None and torch.device(dev).type != "meta":
        return torch.device(dev).type
    types = sorted((v.type for v in iter_values((args, kwargs)) if isinstance(v.type, TensorType)),
                   key=lambda t: t.rank == 0)
    return types[0].device if types else "cpu"


def infer(op: str, args: tuple, kwargs: dict) -> list[TensorType | None]:
    """Output types of ``op`` applied to these arguments, by running the op on meta tensors (on
    the operands' device: meta tensors forget it)."""
    res = resolve(op)(*map_values(args, _to_meta), **map_values(kwargs, _to_meta))
    outs = res if isinstance(res, (tuple, list)) else (res,)
    dev = _device_of(args, kwargs)
    return [dataclasses.replace(TensorType.of(o), device=dev) if isinstance(o, torch.Tensor) else None
            for o in outs]


def run(node: Node, args: tuple, kwargs: dict) -> Any:
    """Reference execution of one (non-fused) node on real tensors."""
    fn = node.attrs.get("callable") or resolve(node.op)
    return fn(*args, **kwargs)


def is_kernel_op(name: str) -> bool:
    """kiln's own ops (kiln.fused, kiln.attention, kiln.matmul ...) each run as one generated
    kernel, launched by the runtime with the kernel codegen made for the node."""
    return name.startswith("kiln.")


def is_random(name: str) -> bool:
    try:
        return bool(resolve(name)._schema.is_mutable) or torch.Tag.nondeterministic_seeded in resolve(name).tags
    except KeyError:
        return True

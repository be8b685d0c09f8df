"""Graph verifier: cheap structural and type checks to run between passes.

Why: a pass that breaks SSA or mislabels a type usually fails much later (wrong kernel, wrong
arena offset). ``verify`` names the node and the problem at the point it was introduced.
Checks: SSA; uses after definitions; constants bound with their declared type; outputs defined;
declared output shape/dtype of known ATen ops agree with meta-tensor inference; fused bodies
verify on their own and agree with their node's arguments and outputs.
"""
from __future__ import annotations

from typing import Any

import torch

from .graph import Graph, Node, Value, iter_values
from .ops import infer, is_known
from .types import TensorType

__all__ = ["VerifyError", "verify"]


class VerifyError(ValueError):
    pass


def _same_shape_dtype(a: TensorType | None, b: TensorType | None) -> bool:
    if a is None or b is None:
        return a is b
    return tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype


def _show(t: TensorType | None) -> str:
    return "scalar" if t is None else str(t)


def _desc(n: Node, i: int) -> str:
    outs = ", ".join(f"%{v.name}" for v in n.outputs)
    return f"node {i} ({outs + ' = ' if outs else ''}{n.op})"


def _metaize(x: Any) -> Any:
    """Factory ops run for real under infer(); send them to the meta device instead."""
    if isinstance(x, torch.device):
        return torch.device("meta")
    if isinstance(x, (list, tuple)):
        return type(x)(_metaize(o) for o in x)
    return x


def _check_inferred(n: Node, fail) -> None:
    ins = n.inputs()
    if not is_known(n.op) or "callable" in n.attrs or any(not isinstance(v.type, TensorType) for v in ins):
        return
    try:
        got = infer(n.op, _metaize(n.args), {k: _metaize(v) for k, v in n.kwargs.items()})
    except Exception:       # no meta kernel, data-dependent op, ...: nothing to compare against
        return
    if len(got) != len(n.outputs):
        fail(f"op returns {len(got)} outputs but {len(n.outputs)} are declared")
    for v, t in zip(n.outputs, got):
        if not _same_shape_dtype(v.type, t):
            fail(f"%{v.name} is declared {_show(v.type)} but {n.op} gives {_show(t)}")


def _check_fused(n: Node, body: Graph, fail) -> None:
    if len(n.args) != len(body.inputs):
        fail(f"{len(n.args)} arguments but the body takes {len(body.inputs)} inputs")
    for i, (a, b) in enumerate(zip(n.args, body.inputs)):
        at = a.type if isinstance(a, Value) else None
        if at != b.type:
            fail(f"argument {i} ({a!r}: {_show(at)}) does not match body input %{b.name}: {_show(b.type)}")
    if len(n.outputs) != len(body.outputs):
        fail(f"{len(n.outputs)} outputs but the body returns {len(body.outputs)}")
    for v, o in zip(n.outputs, body.outputs):
        ot = o.type if isinstance(o, Value) else None
        if not _same_shape_dtype(v.type, ot):
            fail(f"output %{v.name}: {_show(v.type)} does not match body output {o!r}: {_show(ot)}")


def verify(g: Graph, where: str = "") -> None:
    """Raise VerifyError naming the first problem found; ``where`` (e.g. a pass name) prefixes
    the message. A fused body is verified as a standalone graph (no references to outer values)."""
    prefix = f"{where}: " if where else ""
    defined: dict[str, Value] = {}

    def err(msg: str):
        raise VerifyError(prefix + msg)

    for kind, vs in (("input", g.inputs), ("constant", g.constant_values)):
        for v in vs:
            if v.name in defined:
                err(f"{kind} %{v.name} is defined twice")
            defined[v.name] = v
    for v in g.constant_values:
        if v.name not in g.constants:
            err(f"constant %{v.name} has no tensor in graph.constants")
        t = g.constants[v.name]
        if isinstance(t, torch.Tensor):
            if v.type != TensorType.of(t):
                err(f"constant %{v.name} is declared {_show(v.type)} but its tensor is {TensorType.of(t)}")
        elif v.type is not None:
            err(f"constant %{v.name} is declared {_show(v.type)} but is bound to a {type(t).__name__}")

    def check_use(v: Value, what: str, fail):
        d = defined.get(v.name)
        if d is None:
            fail(f"{what} %{v.name} is not defined before use")
        if d is not v and d.type != v.type:
            fail(f"{what} %{v.name} has type {_show(v.type)} but was defined as {_show(d.type)}")

    for i, n in enumerate(g.nodes):
        def fail(msg: str, n=n, i=i):
            err(f"{_desc(n, i)}: {msg}")
        for v in n.inputs():
            check_use(v, "argument", fail)
        for v in n.outputs:
            if v.name in defined:
                fail(f"%{v.name} is defined twice")
            defined[v.name] = v
        body = n.attrs.get("body")
        if isinstance(body, Graph):
            verify(body, f"{prefix}{_desc(n, i)} body")
            if n.op == "kiln.fused":
                _check_fused(n, body, fail)
        elif n.op == "kiln.fused":
            fail("kiln.fused node has no body graph")
        else:
            _check_inferred(n, fail)

    for v in iter_values(g.outputs):
        check_use(v, "graph output", err)

"""The attention pass: every attention in the graph becomes one ``kiln.attention`` kernel node
(and every attention backward one ``kiln.attention_bwd`` node).

Three sources, one kernel node:
- a pattern found by attention_match (matmul, scale, mask, softmax, matmul: however it is spelt);
- ``kiln.attention.default`` / ``kiln.attention_backward.default``, which ``rewrite_fx`` puts in
  place of the pattern before AOTAutograd so that training graphs differentiate one op instead
  of the decomposed softmax (ir/attention_op.py);
- PyTorch's ``_scaled_dot_product_*_attention`` ops (what SDPA lowers to on a GPU).
The kernel node takes the tensors that hold Q, K, V (and the mask) and records, in
``attrs["views"]``, each one as a [B, heads, S, D] view of that tensor's storage, so reshapes,
transposes, contiguous() copies and GQA's repeated K/V are never materialised.
"""
from __future__ import annotations

import math

import torch

from kiln.ir import Graph, Node, Value, resolve
from kiln.ir.attention_op import BACKWARD_OP, OP
from kiln.ir.types import TensorType, contiguous_strides, dtype_name
from .attention_match import Match, NoMatch, _Ctx, causal_offset, find_attention, mask_view
from .cleanup import dce

KERNEL = "kiln.attention"
KERNEL_BWD = "kiln.attention_bwd"
SDPA_OPS = {"aten._scaled_dot_product_flash_attention.default", "aten._scaled_dot_product_efficient_attention.default",
            "aten._scaled_dot_product_cudnn_attention.default",
            "aten._scaled_dot_product_flash_attention_for_cpu.default", "aten.scaled_dot_product_attention.default"}


def _view(t: TensorType, shape=None, strides=None, offset=None) -> dict:
    """How the launcher views an input: the IR layout it is conformed to, then the kernel's view."""
    return {"ir_strides": list(t.strides), "ir_offset": t.offset, "shape": list(shape or t.shape),
            "strides": list(t.strides if strides is None else strides), "offset": t.offset if offset is None else offset}


def _fill(x: float) -> str:
    return repr(float(x))


def _ops(kind: str, mask: str, causal: bool) -> list[str]:
    """The ATen ops one attention kernel computes (what the report lists for it)."""
    masking = (["aten.add.Tensor"] if mask == "add" else []) + (["aten.where.self"] if mask == "bool" or causal else [])
    if kind == "forward":
        return ["aten.bmm.default", "aten.mul.Tensor", *masking, "aten.amax.default", "aten.sub.Tensor",
                "aten.exp.default", "aten.sum.dim_IntList", "aten.div.Tensor"]
    return ["aten.bmm.default", "aten.mul.Tensor", *masking, "aten.exp.default", "aten.sub.Tensor",
            "aten.sum.dim_IntList"]


def _attrs(kind: str, scale, causal, off, mask: Value | None, fill, views, qdtype, vdtype, name, ops=None) -> dict:
    mk = "none" if mask is None else "bool" if mask.type.dtype == torch.bool else "add"
    return {"kind": kind, "scale": float(scale), "causal": bool(causal), "causal_offset": int(off),
            "mask": mk, "fill": _fill(fill), "views": views, "dot_dtype": dtype_name(qdtype),
            "pv_dtype": dtype_name(vdtype), "name": name, "ops": ops or _ops(kind, mk, causal)}


def _fresh(names, shape, dtype, device) -> Value:
    return Value(next(names), TensorType(tuple(shape), dtype, contiguous_strides(shape), device))


# ---- kernel nodes --------------------------------------------------------------------------------
def kernel_for_match(m: Match, names) -> list[Node]:
    b, h = m.batch
    q, k, v = m.q, m.k, m.v
    sq, dv = q.shape[2], v.shape[3]
    dev = m.anchor.out.type.device
    out = _fresh(names, (b, h, sq, dv), m.low or m.anchor.out.type.dtype, dev)
    lse = _fresh(names, (b, h, sq), torch.float32, dev)
    ins = [q.traced.src, k.traced.src, v.traced.src]
    views = [_view(o.traced.src.type, o.shape, o.strides, o.offset) for o in (q, k, v)]
    if m.mask is not None:
        ins.append(m.mask)
        views.append(_view(m.mask.type, *mask_view(m.mask.type, m.mask_shape, b, h)))
    ops = list(dict.fromkeys(n.op for n in [*m.dead, m.anchor]))
    attrs = _attrs("forward", m.scale, m.causal, m.causal_offset, m.mask, m.fill, views, m.low or q.x.type.dtype,
                   m.low or v.x.type.dtype, f"attn_{m.anchor.out.name}", ops)
    kern = Node(KERNEL, tuple(ins), {}, [out, lse], attrs)
    res, cast = out, []
    if out.type.dtype != m.anchor.out.type.dtype:     # computed in the 16-bit dtype SDPA upcast from
        res = _fresh(names, (b, h, sq, dv), m.anchor.out.type.dtype, dev)
        cast = [Node("aten._to_copy.default", (out,), {"dtype": m.anchor.out.type.dtype}, [res])]
    back = Node("aten.view.default", (res, list(m.anchor.out.type.shape)), {}, [m.anchor.out])
    return [*m.prep, kern, *cast, back]


def _from_op(n: Node) -> Node:
    q, k, v, mask, scale, causal, off, fill = n.args[:8]       # (out_bshd is the output's IR layout)
    b, h, sq, _ = q.type.shape
    ins = [q, k, v] + ([mask] if mask is not None else [])
    views = [_view(t.type) for t in (q, k, v)]
    if mask is not None:
        views.append(_view(mask.type, *mask_view(mask.type, (b, h, sq, k.type.shape[2]), b, h)))
    return Node(KERNEL, tuple(ins), {}, list(n.outputs),
                _attrs("forward", scale, causal, off, mask, fill, views, q.type.dtype, v.type.dtype, f"attn_{n.out.name}"))


def _from_backward_op(n: Node) -> Node:
    dout, q, k, v, mask, out, lse, scale, causal, off, fill = n.args
    b, h, sq, _ = q.type.shape
    ins = [dout, q, k, v, out, lse] + ([mask] if mask is not None else [])
    views = [_view(t.type) for t in (dout, q, k, v, out, lse)]
    if mask is not None:
        views.append(_view(mask.type, *mask_view(mask.type, (b, h, sq, k.type.shape[2]), b, h)))
    return Node(KERNEL_BWD, tuple(ins), {}, list(n.outputs),
                _attrs("backward", scale, causal, off, mask, fill, views, q.type.dtype, v.type.dtype,
                       f"attn_bwd_{n.outputs[0].name}"))


def _bind(n: Node) -> dict:
    schema = resolve(n.op)._schema
    got = {a.name: (n.args[i] if i < len(n.args) else n.kwargs.get(a.name, a.default_value))
           for i, a in enumerate(schema.arguments)}
    return got


def sdpa_params(c: _Ctx, n: Node):
    """(q, k, v, mask, scale, causal, offset) of an SDPA op this kernel can run, else NoMatch."""
    a = _bind(n)
    q, k, v = a["query"], a["key"], a["value"]
    mask = a.get("attn_mask", a.get("attn_bias"))
    if a.get("dropout_p") or q.type is None or q.type.rank != 4 or k.type.rank != 4:
        raise NoMatch("dropout, or not [B, H, S, D]")
    if k.type.shape[1] != q.type.shape[1] and not (a.get("enable_gqa") and q.type.shape[1] % k.type.shape[1] == 0):
        raise NoMatch("head counts differ")
    for o in n.outputs[1:]:
        if c.users.get(o.name) or o.name in c.outputs:
            raise NoMatch("uses more than the output")
    scale = a.get("scale")
    scale = 1.0 / math.sqrt(q.type.shape[-1]) if scale is None else float(scale)
    causal, off = bool(a.get("is_causal")), 0
    if isinstance(mask, Value):
        t = c.evaluate(mask)
        if t is not None:
            keep = t if t.dtype == torch.bool else t == 0
            keep = keep.broadcast_to((*q.type.shape[:2], q.type.shape[2], k.type.shape[2]))
            if bool(keep.all()):
                mask = None
            elif (t.dtype == torch.bool or bool(((t == 0) | (t <= -1e4)).all())) and \
                    (o := causal_offset(keep)) is not None and o >= 0:
                mask, causal, off = None, True, o
    return q, k, v, mask if isinstance(mask, Value) else None, scale, causal, off


def _from_sdpa(c: _Ctx, n: Node, names) -> Node:
    q, k, v, mask, scale, causal, off = sdpa_params(c, n)
    b, h, sq, _ = q.type.shape
    lse = _fresh(names, (b, h, sq), torch.float32, q.type.device)
    ins = [q, k, v] + ([mask] if mask is not None else [])
    views = [_view(t.type) for t in (q, k, v)]
    if mask is not None:
        views.append(_view(mask.type, *mask_view(mask.type, (b, h, sq, k.type.shape[2]), b, h)))
    return Node(KERNEL, tuple(ins), {}, [n.outputs[0], lse],
                _attrs("forward", scale, causal, off, mask, -math.inf, views, q.type.dtype, v.type.dtype,
                       f"attn_{n.outputs[0].name}"))


def attention(g: Graph, options=None) -> Graph:
    """Pipeline pass. Pattern matching follows ``options.fusion``; the kiln ops are always
    lowered to kernel nodes (nothing else can run them)."""
    fuse = getattr(options, "fusion", True)
    c = _Ctx(g)
    names = c.names
    matches = find_attention(g, None, c) if fuse else []
    at = {id(m.anchor): m for m in matches}
    dead = {id(d) for m in matches for d in m.dead}
    nodes, changed = [], bool(matches)
    for n in g.nodes:
        if id(n) in dead:
            continue
        if id(n) in at:
            nodes += kernel_for_match(at[id(n)], names)
        elif n.op == OP:
            nodes.append(_from_op(n))
            changed = True
        elif n.op == BACKWARD_OP:
            nodes.append(_from_backward_op(n))
            changed = True
        elif n.op in SDPA_OPS and fuse:
            try:
                nodes.append(_from_sdpa(c, n, names))
                changed = True
            except NoMatch:
                nodes.append(n)
        else:
            nodes.append(n)
    return dce(g.copy(nodes)) if changed else g


__all__ = ["attention", "find_attention", "kernel_for_match", "KERNEL", "KERNEL_BWD"]

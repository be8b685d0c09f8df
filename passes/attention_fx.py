"""Attention before AOTAutograd: put ``kiln::attention`` in place of every attention pattern in
a Dynamo graph, so AOTAutograd differentiates one op (its backward is ``kiln::attention_backward``)
instead of a decomposed softmax, and the forward and backward graphs each reach codegen as one
attention kernel.

How: the Dynamo graph is traced to ATen with kiln's decompositions (the form every other path
sees), the shared matcher (attention_match) finds the patterns on that kiln Graph, each match
becomes the custom op on [B, H, S, D] views of the tensors holding Q, K and V, and the rewritten
graph goes back to FX for AOTAutograd. Graphs with nothing to rewrite (or that cannot be traced
here: symbolic shapes, higher-order ops) are returned untouched.
"""
from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from kiln.ir import Graph, Node, Value, contiguous_strides, infer, map_values, resolve
from kiln.ir.attention_op import OP
from .attention import SDPA_OPS, sdpa_params
from .attention_layout import VIEW_OPS, Layout, NotAnalysable, apply_view, is_copy, mirrors
from .attention_match import Match, NoMatch, Operand, _Ctx, find_attention
from .cleanup import dce

log = logging.getLogger("kiln.attention")
_HINTS = ("softmax", "scaled_dot_product")


def _mentions_attention(gm: fx.GraphModule) -> bool:
    return any(any(h in str(getattr(n.target, "__name__", n.target)) for h in _HINTS)
               for n in gm.graph.nodes if n.op in ("call_function", "call_method"))


def rewrite_fx(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    """The Dynamo graph with attention as ``kiln::attention``, or ``gm`` itself. A mask built
    from a module buffer (``register_buffer("mask", torch.tril(...))``) is evaluated as if
    constant, so it can become causal block skipping; the result then carries
    ``kiln_frozen_inputs``: [(input index, data_ptr, version)] of the buffers this relied on,
    which the caller checks before each call (``kiln.api.FrozenInputGuard``)."""
    if not _mentions_attention(gm) or not all(isinstance(x, torch.Tensor) for x in example_inputs):
        return gm
    try:
        from kiln.ir.capture import from_fx, retrace
        aten = retrace(gm, list(example_inputs))
        g = dce(from_fx(aten))
        if any(n.op.startswith("py.") for n in g.nodes) or \
                any(isinstance(t, torch.Tensor) and t.requires_grad for t in g.constants.values()):
            return gm
        need = _needs_grad(g, example_inputs)
        buffers = _buffer_inputs(gm, example_inputs)
        frozen = {g.inputs[i].name: example_inputs[i] for i in buffers if i < len(g.inputs)}
        g2, used = substitute(g, lambda v: v.name in need, frozen, with_used=True)
        if g2 is None:
            return gm
        out = aten.graph.find_nodes(op="output")[0].args[0]
        gm2 = to_fx(g2, tuple_output=isinstance(out, (tuple, list)))
        index = {v.name: i for i, v in enumerate(g.inputs)}
        gm2.kiln_frozen_inputs = [(index[n], example_inputs[index[n]].data_ptr(), example_inputs[index[n]]._version)
                                  for n in sorted(used, key=index.get)]
        return gm2
    except Exception as e:      # noqa: BLE001 - never worse than no rewrite
        log.debug("attention rewrite skipped: %s: %s", type(e).__name__, e)
        return gm


def _buffer_inputs(gm: fx.GraphModule, example_inputs) -> list[int]:
    """Positions of the Dynamo graph's inputs that are module buffers (by Dynamo's source of
    each placeholder) with a version counter to guard on (inference-mode tensors have none)."""
    out = []
    for i, n in enumerate(gm.graph.find_nodes(op="placeholder")):
        ga = n.meta.get("grapharg")
        src = getattr(getattr(ga, "source", None), "name", None)
        name = src() if callable(src) else src
        if not isinstance(name, str) or "._buffers[" not in name or i >= len(example_inputs):
            continue
        t = example_inputs[i]
        try:
            t._version
        except RuntimeError:
            continue
        if not t.requires_grad and t.numel() <= 1 << 26:
            out.append(i)
    return out


def _needs_grad(g: Graph, example_inputs) -> set[str]:
    if not torch.is_grad_enabled():         # an inference graph: nothing is differentiated
        return set()
    need = {v.name for v, x in zip(g.inputs, example_inputs) if x.requires_grad}
    for n in g.nodes:
        if n.op != "aten.detach.default" and any(v.name in need for v in n.inputs()):
            need.update(o.name for o in n.outputs if o.type is not None and o.type.dtype.is_floating_point)
    return need


def substitute(g: Graph, needs_grad=None, frozen: dict | None = None, with_used: bool = False):
    """``g`` with each attention as the custom op (None if there is none); with ``with_used``
    also the names of the ``frozen`` inputs whose values the result relies on."""
    c = _Ctx(g, needs_grad, frozen)
    res = _substitute(g, c, needs_grad)
    return (res, c.frozen_used if res is not None else set()) if with_used else res


def _substitute(g: Graph, c: _Ctx, needs_grad) -> Graph | None:
    matches = find_attention(g, needs_grad, c)
    at = {id(m.anchor): m for m in matches}
    dead = {id(d) for m in matches for d in m.dead}
    nodes, changed = [], bool(matches)
    for n in g.nodes:
        if id(n) in dead:
            continue
        if id(n) in at:
            nodes += _op_nodes(c, at[id(n)])
        elif n.op in SDPA_OPS:
            try:
                q, k, v, mask, scale, causal, off = sdpa_params(c, n)
            except NoMatch:
                nodes.append(n)
                continue
            if mask is not None and needs_grad and needs_grad(mask):
                nodes.append(n)
                continue
            st = n.outputs[0].type.strides        # keep the op's output layout: later views rely on it
            args = (q, k, v, mask, scale, causal, off, float("-inf"), st[2] > st[1])
            out_t, lse_t = infer(OP, args, {})
            if out_t.strides != st and n.outputs[0].type.numel > 1:
                nodes.append(n)
                continue
            nodes.append(Node(OP, args, {}, [n.outputs[0], Value(next(c.names), lse_t)]))
            changed = True
        else:
            nodes.append(n)
    return dce(bshd_outputs(g.copy(nodes))) if changed else None


def bshd_outputs(g: Graph) -> Graph:
    """An attention output that the model copies into [B, S, H, D] order (transpose(1, 2) and a
    contiguous copy before the output projection, however many views and copies spell it) is
    written in that order by the kernel, and the copy becomes a view of it: one copy kernel fewer,
    and a training forward saves one tensor where it saved two (the output for the attention
    backward, the copy for the projection's). Only single-use chains of views and same-dtype copies
    are followed; the copy's elements must sit exactly where the [B, S, H, D] output holds them."""
    users: dict[str, list[Node]] = {}
    for n in g.nodes:
        for v in n.inputs():
            users.setdefault(v.name, []).append(n)
    escaping = {v.name for v in g.output_values()}
    swap: dict[int, list[Node]] = {}
    for n in g.nodes:
        if n.op != OP or (len(n.args) > 8 and n.args[8]):
            continue
        out = n.outputs[0]
        b, h, s, d = out.type.shape
        lay, cur, last = Layout.of(out.type.with_(strides=(s * h * d, d, h * d, 1))), out, None
        while len(users.get(cur.name, ())) == 1 and cur.name not in escaping:
            u = users[cur.name][0]
            if len(u.outputs) != 1 or not u.args or u.args[0] is not cur:
                break
            nxt = u.outputs[0]
            if u.op in VIEW_OPS:
                try:
                    lay = apply_view(lay, u, nxt)
                except NotAnalysable:
                    break
            elif not (is_copy(u) and nxt.type.dtype == cur.type.dtype):
                break
            elif nxt.type.strides == contiguous_strides(nxt.type.shape) and mirrors(lay, nxt.type):
                last = u
            cur = nxt
        if last is None:
            continue
        args = (*n.args[:8], True)
        out_t, lse_t = infer(OP, args, {})
        if out_t.shape != out.type.shape or out_t.strides != (s * h * d, d, h * d, 1):
            continue
        new = Value(out.name, out_t)
        perm = Value(out.name + "_bshd", out_t.with_(shape=(b, s, h, d), strides=contiguous_strides((b, s, h, d))))
        copied = last.outputs[0]
        swap[id(n)] = [Node(OP, args, {}, [new, *n.outputs[1:]], dict(n.attrs))]
        swap[id(last)] = [Node("aten.permute.default", (new, [0, 2, 1, 3]), {}, [perm]),
                          Node("aten.view.default", (perm, list(copied.type.shape)), {}, [copied])]
    if not swap:
        return g
    return g.copy([m for n in g.nodes for m in swap.get(id(n), [n])])


# ---- emitting the custom op -----------------------------------------------------------------------
def _op_nodes(c: _Ctx, m: Match) -> list[Node]:
    c.prep = list(m.prep)
    b, h = m.batch
    scale = m.alpha
    ts, srcs = [], []
    for which, o in (("q", m.q), ("k", m.k), ("v", m.v)):
        t, from_src = _tensor4(c, o, which, b, h, kv_from_src=None if which != "v" else srcs[1], dtype=m.low)
        scale *= o.traced.scale if from_src and which != "v" else 1.0
        ts.append(t)
        srcs.append(from_src)
    if len({t.type.dtype for t in ts}) != 1:
        raise NoMatch("Q, K and V in different dtypes")
    mask = m.mask
    if mask is not None and not (len(m.mask_shape) == 4 and tuple(m.mask_shape[:2]) == (b, h)):
        mask = c.emit("aten.reshape.default", c.emit("aten.expand.default", mask, list(m.mask_shape)),
                      [b, h, *m.mask_shape[-2:]])
    args = (*ts, mask, float(scale), m.causal, int(m.causal_offset), float(m.fill))
    out_t, lse_t = infer(OP, args, {})
    out, lse = Value(next(c.names), out_t), Value(next(c.names), lse_t)
    nodes = [*c.prep, Node(OP, args, {}, [out, lse])]
    res = out
    if out_t.dtype != m.anchor.out.type.dtype:
        res = Value(next(c.names), out_t.with_(dtype=m.anchor.out.type.dtype))
        nodes.append(Node("aten._to_copy.default", (out,), {"dtype": m.anchor.out.type.dtype}, [res]))
    nodes.append(Node("aten.view.default", (res, list(m.anchor.out.type.shape)), {}, [m.anchor.out]))
    return nodes


def _tensor4(c: _Ctx, o: Operand, which: str, b: int, h: int, kv_from_src=None,
             dtype: torch.dtype | None = None) -> tuple[Value, bool]:
    """The operand as a [B, heads, S, D] tensor: views of its source where view + select +
    permute express it (no copy, GQA kept), else a reshape of the matmul's own operand. V follows
    K (``kv_from_src``), so both carry the same number of heads. ``dtype``: the one to compute in
    (default: the matmul's)."""
    src, want = o.traced.src, dtype or o.x.type.dtype
    t = _factored_view(c, src, o.shape, o.strides, o.offset) if kv_from_src is not False else None
    if t is not None and kv_from_src is None and which == "v":
        t = None
    from_src = t is not None
    if t is None:
        x = o.x if o.x.type.rank == 3 else c.emit("aten.unsqueeze.default", o.x, 0)
        z, r, s = x.type.shape
        if which == "k":
            t = c.emit("aten.transpose.int", c.emit("aten.reshape.default", x, [b, h, r, s]), 2, 3)
        else:
            t = c.emit("aten.reshape.default", x, [b, h, r, s])
    if t.type.dtype != want:
        t = c.emit("aten._to_copy.default", t, dtype=want)
    return t, from_src


def _factored_view(c: _Ctx, src: Value, shape, strides, offset) -> Value | None:
    """``as_strided(src, shape, strides, offset)`` spelt as view + select + permute (+ unsqueeze),
    which autograd differentiates cheaply, or None when those cannot express it."""
    dims = [(i, n, s) for i, (n, s) in enumerate(zip(shape, strides)) if n != 1]
    ty = src.type
    if any(s == 0 for _, _, s in dims) or ty.offset != 0:
        return None
    order = sorted(range(ty.rank), key=lambda i: -ty.strides[i])     # the source in memory order
    big = [i for i in order if ty.shape[i] != 1]
    if contiguous_strides([ty.shape[i] for i in big]) != tuple(ty.strides[i] for i in big):
        return None
    factors, cur = [], ty.numel
    for i, n, s in sorted(dims, key=lambda d: -d[2]):
        if cur % (n * s):
            return None
        if cur // (n * s) > 1:
            factors.append((cur // (n * s), n * s, None))
        factors.append((n, s, i))
        cur = s
    if cur > 1:
        factors.append((cur, 1, None))
    idx, off = [], offset
    for size, st, t in factors:
        digit, off = divmod(off, st)
        if digit >= size or (t is not None and digit):
            return None
        idx.append(digit)
    if off:
        return None
    if order != sorted(order):
        src = c.emit("aten.permute.default", src, order)
    v = c.emit("aten.view.default", src, [f[0] for f in factors])
    for pos in reversed(range(len(factors))):
        if factors[pos][2] is None:
            v = c.emit("aten.select.int", v, pos, idx[pos])
    order = [f[2] for f in factors if f[2] is not None]
    perm = sorted(range(len(order)), key=lambda j: order[j])
    if perm != list(range(len(perm))):
        v = c.emit("aten.permute.default", v, perm)
    for i, n in enumerate(shape):
        if n == 1:
            v = c.emit("aten.unsqueeze.default", v, i)
    return v


# ---- back to FX -------------------------------------------------------------------------------------
def _multi(op: str) -> bool:
    rets = resolve(op)._schema.returns
    return len(rets) != 1 or str(rets[0].type).startswith("List")


def to_fx(g: Graph, tuple_output: bool = True) -> fx.GraphModule:
    """A GraphModule calling each node's ATen op (constants become attributes)."""
    root, graph, env = torch.nn.Module(), fx.Graph(), {}
    for v in g.inputs:
        env[v.name] = graph.placeholder(v.name)
    for i, v in enumerate(g.constant_values):
        setattr(root, f"_kiln_const{i}", g.constants[v.name])
        env[v.name] = graph.get_attr(f"_kiln_const{i}")
    get = lambda v: env[v.name]  # noqa: E731
    for n in g.nodes:
        r = graph.call_function(resolve(n.op), map_values(n.args, get), map_values(n.kwargs, get))
        if _multi(n.op):
            for i, o in enumerate(n.outputs):
                env[o.name] = graph.call_function(operator.getitem, (r, i))
        else:
            env[n.out.name] = r
    outs = map_values(list(g.outputs), get)
    graph.output(tuple(outs) if tuple_output else outs[0])
    return fx.GraphModule(root, graph)

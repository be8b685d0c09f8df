"""Recognise attention in an ATen graph by its structure, not by its spelling.

Anchor: a batched matmul ``P @ V`` whose left operand is, up to reshapes and casts, a softmax over
its last dim (the decomposed amax/sub/exp/sum/div, ``_softmax``, or PyTorch's safe softmax).
From the softmax input walk back to the matmul ``Q @ Kᵀ`` through what models put between:
scalar scalings (multiply or divide), additive masks, ``where`` masks with a scalar fill
(masked_fill), casts and reshapes of the batch dims. Q, K and V are traced back to the tensors
holding their data (attention_layout.trace), which also finds GQA/MQA (a stride-0 head
sub-dim from expand or repeat_interleave). Masks whose value is known at compile time (built
from constants and factories: tril, triu, arange comparisons) are evaluated: an all-keep mask
disappears and a lower-triangular one becomes ``causal`` (the kernel then skips whole blocks).

Anything outside this shape (dropout between softmax and matmul, an intermediate that is used
elsewhere, a mask that needs a gradient) is left alone: the graph runs as before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import _disable_current_modes

from kiln.ir import Graph, Node, Value, infer
from kiln.ir.ops import is_random
from .attention_layout import Layout, NotAnalysable, Traced, coalesce, is_copy, split_outer, trace

NEG_BIG = -1e4         # a fill or bias at or below this masks its key (exp underflows to 0)


class NoMatch(Exception):
    pass


@dataclass
class Operand:
    traced: Traced              # source tensor and its layout ([Z, S, D] as the matmul reads it)
    x: Value                    # the matmul operand as the graph computes it ([Z, S, D] or Kᵀ [Z, D, S])
    shape: tuple = ()           # the operand as a [B, heads, S, D] view of traced.src's storage
    strides: tuple = ()
    offset: int = 0


@dataclass
class Match:
    anchor: Node                # the P @ V matmul; the kernel takes its place
    q: Operand
    k: Operand
    v: Operand
    batch: tuple[int, int]      # (B, H): the matmul batch dim as B x H, query heads inner
    alpha: float                # scaling applied to the scores (Q/K-side factors are in traced.scale)
    causal: bool = False
    causal_offset: int = 0
    mask: Value | None = None   # keep-mask (bool) or additive bias (float), broadcastable to mask_shape
    mask_shape: tuple = ()      # the scores' shape where the mask applies ([..., Sq, Sk])
    fill: float = float("-inf")
    prep: list[Node] = field(default_factory=list)   # nodes that build `mask` (to insert before the kernel)
    dead: list[Node] = field(default_factory=list)   # nodes the kernel replaces
    low: torch.dtype | None = None   # compute in this 16-bit dtype: SDPA's math path upcast Q, K, V from it

    @property
    def scale(self) -> float:
        return self.alpha * self.q.traced.scale * self.k.traced.scale


# ---- small recognisers -------------------------------------------------------------------------
class _Ctx:
    def __init__(self, g: Graph, needs_grad=None, frozen: dict | None = None):
        """``frozen``: graph inputs whose values may be read as if constant (a module's buffers,
        such as a causal mask); ``frozen_used`` collects those a decision was taken on, which the
        caller must guard (their value at compile time is baked into the rewritten graph)."""
        self.g = g
        self.prod = g.producers()
        self.users = g.users()
        self.outputs = {v.name for v in g.output_values()}
        self.needs_grad = needs_grad or (lambda v: False)
        self.names = g.fresh_namer("attn")
        self.frozen = frozen or {}
        self.frozen_used: set[str] = set()

    def node(self, v) -> Node | None:
        return self.prod.get(v.name) if isinstance(v, Value) else None

    def scalar(self, x) -> float | None:
        """A compile-time scalar: a Python number, a one-element constant, or a scalar factory."""
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return float(x)
        if not isinstance(x, Value) or x.type is None or x.type.numel != 1:
            return None
        if x.name in self.g.constants:
            with _disable_current_modes():
                return float(self.g.constants[x.name].reshape(()).item())
        n = self.node(x)
        if n is not None and n.op == "aten.scalar_tensor.default":
            return float(n.args[0])
        if n is not None and n.op == "aten.full.default":
            return float(n.args[1])
        if n is not None and (is_copy(n) or n.op in ("aten.alias.default", "aten.view.default")):
            return self.scalar(n.args[0])
        return None

    def emit(self, op: str, *args, **kwargs) -> Value:
        """A new node computing ``op`` (for combining masks); returns its output."""
        t = infer(op, args, kwargs)[0]
        v = Value(next(self.names), t)
        self.prep.append(Node(op, args, kwargs, [v]))
        return v

    def evaluate(self, v: Value, limit: int = 1 << 26) -> torch.Tensor | None:
        """The value of ``v`` if it follows from constants and factories alone, else None."""
        memo: dict[str, torch.Tensor] = {}
        touched: set[str] = set()

        def ev(x):
            if not isinstance(x, Value):
                return x
            if x.name in memo:
                return memo[x.name]
            if x.name in self.g.constants:
                return self.g.constants[x.name]
            if x.name in self.frozen:
                touched.add(x.name)
                return self.frozen[x.name]
            n = self.node(x)
            if n is None or n.op.startswith(("py.", "kiln.")) or is_random(n.op) or \
                    any(o.type is not None and o.type.numel > limit for o in n.outputs):
                raise NoMatch
            from kiln.ir.graph import map_values
            from kiln.ir.ops import run
            res = run(n, map_values(n.args, ev), map_values(n.kwargs, ev))
            for o, r in zip(n.outputs, res if isinstance(res, (tuple, list)) else (res,)):
                memo[o.name] = r
            return memo[x.name]
        try:
            with _disable_current_modes():
                out = ev(v)
        except Exception:
            return None
        self.frozen_used |= touched         # conservatively: any value read may steer a decision
        return out


_RESHAPES = {"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.alias.default",
             "aten.detach.default", "aten.expand.default", "aten.unsqueeze.default", "aten.squeeze.dim",
             "aten.squeeze.dims", "aten.squeeze.default"}


def _is_reshape(n: Node) -> bool:
    """Reindexing that keeps row-major order (dims regrouped, nothing broadcast; a permute only
    moves size-1 dims, as einsum's lowering does)."""
    if not n.args or not isinstance(n.args[0], Value) or n.args[0].type is None:
        return False
    if n.op == "aten.permute.default":
        shape = n.args[0].type.shape
        moved = [d % len(shape) for d in n.args[1] if shape[d % len(shape)] != 1]
        return moved == sorted(moved)
    return n.op in _RESHAPES and n.args[0].type.numel == n.out.type.numel


def _last_dim(dims, rank: int) -> bool:
    dims = [dims] if isinstance(dims, int) else list(dims)
    return len(dims) == 1 and dims[0] % rank == rank - 1


def _softmax_core(c: _Ctx, p: Value):
    n = c.node(p)
    if n is None:
        return None
    if n.op in ("aten._softmax.default", "aten._safe_softmax.default") and _last_dim(n.args[1], p.type.rank):
        return n.args[0], [n]
    if n.op == "aten.div.Tensor":
        e, s = n.args[:2]
    elif n.op == "aten.mul.Tensor" and c.node(n.args[1]) is not None and c.node(n.args[1]).op == "aten.reciprocal.default":
        e, s = n.args[0], c.node(n.args[1]).args[0]
    else:
        return None
    ne, ns = c.node(e), c.node(s)
    if ne is None or ne.op != "aten.exp.default" or ns is None or ns.op != "aten.sum.dim_IntList" or ns.args[0] is not e:
        return None
    nsub = c.node(ne.args[0])
    if nsub is None or nsub.op != "aten.sub.Tensor":
        return None
    x, m = nsub.args[:2]
    nm, hops = c.node(m), []
    while nm is not None and nm.op in ("aten.detach.default", "aten.alias.default"):
        hops.append(nm)
        nm = c.node(nm.args[0])
    if nm is None or nm.op != "aten.amax.default" or nm.args[0] is not x:
        return None
    rank = x.type.rank
    if not (_last_dim(nm.args[1], rank) and _last_dim(ns.args[1], rank)):
        return None
    extra = [n] if n.op == "aten.div.Tensor" else [n, c.node(n.args[1])]
    return x, [*hops, nm, nsub, ne, ns, *extra]


def _softmax(c: _Ctx, p: Value):
    """(softmax input, nodes) for a softmax over the last dim, including PyTorch's safe softmax
    (``where(row is all -inf, 0, softmax)``), or None."""
    n = c.node(p)
    if n is not None and n.op == "aten.where.self" and _zeros(c, n.args[1]):
        core = _softmax_core(c, n.args[2])
        if core is None:
            return None
        x, nodes = core
        test = _all_masked_test(c, n.args[0], x)
        return (x, nodes + test + [n] + ([c.node(n.args[1])] if c.node(n.args[1]) else [])) if test else None
    return _softmax_core(c, p)


def _zeros(c: _Ctx, v) -> bool:
    if c.scalar(v) == 0.0:
        return True
    n = c.node(v)
    return n is not None and ((n.op == "aten.full_like.default" and n.args[1] == 0) or n.op == "aten.zeros_like.default")


def _all_masked_test(c: _Ctx, cond: Value, x: Value) -> list[Node] | None:
    """logical_not(any(logical_not(x == -inf), -1, keepdim)): the row has no key left."""
    chain, cur = [], cond
    for op in ("aten.logical_not.default", "aten.any.dim", "aten.logical_not.default", "aten.eq.Scalar"):
        n = c.node(cur)
        if n is None or n.op != op:
            return None
        chain.append(n)
        cur = n.args[0]
    return chain if cur is x and chain[-1].args[1] == float("-inf") else None


# ---- the score chain between Q @ Kᵀ and the softmax ---------------------------------------------
def _score_chain(c: _Ctx, x: Value):
    """Walk from the softmax input back to the Q @ Kᵀ matmul. Returns (matmul, steps, nodes);
    steps are in application order: ("scale", c) | ("add", M, coef, shape) | ("where", cond,
    keep_if_true, fill, shape) | ("shift",)."""
    steps, nodes, cur = [], [], x
    qk = None
    for _ in range(64):
        n = c.node(cur)
        if n is None:
            raise NoMatch("scores come from no matmul")
        if n.op in ("aten.bmm.default", "aten.mm.default"):
            qk = n
            break
        if len(n.outputs) != 1:
            raise NoMatch(f"{n.op} has several outputs")
        nodes.append(n)
        shape = tuple(n.out.type.shape)
        if _is_reshape(n) or is_copy(n):
            cur = n.args[0]
            continue
        args = list(n.args)
        if n.op in ("aten.mul.Tensor", "aten.mul.Scalar", "aten.div.Tensor", "aten.div.Scalar"):
            i = 0 if c.scalar(args[1]) is not None else 1 if n.op == "aten.mul.Tensor" and c.scalar(args[0]) is not None else None
            if i is None:
                raise NoMatch(f"{n.op} by a tensor")
            f = c.scalar(args[1 - i])
            steps.append(("scale", f if n.op.startswith("aten.mul") else 1.0 / f))
            cur = args[i]
        elif n.op in ("aten.add.Tensor", "aten.sub.Tensor"):
            sign = -1.0 if n.op == "aten.sub.Tensor" else 1.0
            alpha = float(n.kwargs.get("alpha", 1))
            on = [_on_chain(c, a) for a in args[:2]]
            if on == [True, False]:
                cur, other, coef = args[0], args[1], sign * alpha
            elif on == [False, True] and sign > 0:       # mask + scores (* alpha)
                cur, other, coef = args[1], args[0], 1.0
                if alpha != 1:
                    steps.append(("scale", alpha))
            else:
                raise NoMatch(f"{n.op}: cannot tell the scores from the mask")
            steps.append(("shift",) if c.scalar(other) is not None else ("add", other, coef, shape))
            if cur.type.shape != n.out.type.shape:
                raise NoMatch("the scores are broadcast")
        elif n.op == "aten.where.self":
            cond, a, b = args
            fa, fb = c.scalar(a), c.scalar(b)
            if fb is not None and fa is None:
                steps.append(("where", cond, True, fb, shape))
                cur = a
            elif fa is not None and fb is None:
                steps.append(("where", cond, False, fa, shape))
                cur = b
            else:
                raise NoMatch("where between two tensors")
            if cur.type.shape != n.out.type.shape:
                raise NoMatch("the scores are broadcast")
        else:
            raise NoMatch(f"{n.op} between the matmul and the softmax")
    if qk is None:
        raise NoMatch("score chain too long")
    steps.reverse()
    return qk, steps, nodes


def _on_chain(c: _Ctx, v) -> bool:
    """Is ``v`` (a binary op's argument) the score path, i.e. does it come from a batched matmul
    through score-chain ops only?"""
    for _ in range(64):
        n = c.node(v)
        if n is None:
            return False
        if n.op in ("aten.bmm.default", "aten.mm.default"):
            return True
        if _is_reshape(n) or is_copy(n):
            v = n.args[0]
            continue
        if n.op not in _ARITH:
            return False
        args = n.args[1:] if n.op == "aten.where.self" else n.args[:2]
        cands = [a for a in args if isinstance(a, Value) and a.type is not None and
                 a.type.shape == n.out.type.shape and a.type.dtype.is_floating_point]
        return any(_on_chain(c, a) for a in cands)
    return False


_ARITH = {"aten.mul.Tensor", "aten.mul.Scalar", "aten.div.Tensor", "aten.div.Scalar", "aten.add.Tensor",
          "aten.sub.Tensor", "aten.where.self"}


# ---- masks ---------------------------------------------------------------------------------------
def causal_offset(keep: torch.Tensor) -> int | None:
    """``o`` such that keep[..., i, j] == (j <= i + o) for every leading index, or None."""
    sq, sk = keep.shape[-2:]
    k2 = keep.reshape(-1, sq, sk)
    for off in {int(k2[0, 0].sum()) - 1, int(k2[0, -1].sum()) - sq}:
        want = torch.ones(sq, sk, dtype=torch.bool, device=keep.device).tril(off)
        if bool((k2 == want).all()):
            return off
    return None


def _resolve_masks(c: _Ctx, steps) -> tuple[float, list, list, int | None]:
    """Fold the score steps into alpha * scores (+ bias) (where keep else fill); evaluate the
    masks known at compile time. Returns (alpha, additive masks, where masks, causal offset or None)."""
    alpha, adds, bools = 1.0, [], []
    for st in steps:
        if st[0] == "scale":
            if st[1] <= 0 and bools:
                raise NoMatch("a non-positive scale after a masked fill")
            alpha *= st[1]
            adds = [(m, coef * st[1], shp) for m, coef, shp in adds]
            bools = [(cd, pol, fill * st[1], shp) for cd, pol, fill, shp in bools]
        elif st[0] in ("add", "shift"):
            if any(math.isfinite(b[2]) for b in bools):
                raise NoMatch("an addition after a finite masked fill")
            if st[0] == "add":
                adds.append(st[1:])
        else:
            if bools and bools[0][2] != st[3]:
                raise NoMatch("masked fills with different values")
            bools.append(st[1:])
    causal = None
    kept_adds, kept_bools = [], []
    for m, coef, shp in adds:
        t = c.evaluate(m)
        if t is not None:
            t = (t.float() * coef).broadcast_to(shp)
            if bool((t == 0).all()):
                continue
            off = causal_offset(t == 0) if bool(((t == 0) | (t <= NEG_BIG)).all()) else None
            if off is not None and off >= 0:
                causal = off if causal is None else min(causal, off)
                continue
        if c.needs_grad(m):
            raise NoMatch("the additive mask needs a gradient")
        kept_adds.append((m, coef, shp))
    for cond, pol, fill, shp in bools:
        t = c.evaluate(cond)
        if t is not None:
            keep = (t.bool() if pol else ~t.bool()).broadcast_to(shp)
            if bool(keep.all()):
                continue
            off = causal_offset(keep) if fill <= NEG_BIG else None
            if off is not None and off >= 0:
                causal = off if causal is None else min(causal, off)
                continue
        kept_bools.append((cond, pol, fill, shp))
    return alpha, kept_adds, kept_bools, causal


def _mask_tensor(c: _Ctx, adds, bools):
    """One mask tensor for the kernel: (value, shape it applies at, fill) or (None, (), -inf)."""
    if not adds and not bools:
        return None, (), float("-inf")
    shapes = {shp for *_, shp in adds} | {shp for *_, shp in bools}
    if len(shapes) != 1:
        raise NoMatch("masks applied at differently shaped scores")
    shape = shapes.pop()
    keep = None
    for cond, pol, fill, _ in bools:
        term = cond if pol else c.emit("aten.logical_not.default", cond)
        keep = term if keep is None else c.emit("aten.logical_and.default", keep, term)
    fill = bools[0][2] if bools else float("-inf")
    bias = None
    for m, coef, _ in adds:
        term = m if coef == 1 else c.emit("aten.mul.Tensor", m, coef)
        bias = term if bias is None else c.emit("aten.add.Tensor", bias, term)
    if bias is None:
        return keep, shape, fill
    if keep is not None:
        if fill != float("-inf"):
            raise NoMatch("an additive mask with a finite masked fill")
        bias = c.emit("aten.where.ScalarOther", keep, bias, float("-inf"))
    return bias, shape, fill


# ---- operands as [B, heads, S, D] -------------------------------------------------------------------
def _as4(t: Traced, b: int, h: int, gqa: bool) -> tuple[tuple, tuple, int, int]:
    """The traced [Z, S, D] operand as a [B, heads, S, D] view: (shape, strides, offset, rep)."""
    lay = t.layout
    outer, inner = split_outer(lay.dims[0], b)
    ob = coalesce(outer)
    if len(ob) > 1:
        raise NotAnalysable("batch sub-dims")
    inner, rep = coalesce(inner), 1
    while gqa and inner and inner[-1][1] == 0:
        rep *= inner.pop()[0]
    if len(inner) > 1 or h % rep:
        raise NotAnalysable("head sub-dims")
    (s, ss), (d, sd) = lay.single(1), lay.single(2)
    return (b, h // rep, s, d), (ob[0][1] if ob else 0, inner[0][1] if inner else 0, ss, sd), lay.offset, rep


def mask_view(t, shape: tuple, b: int, h: int) -> tuple[tuple, tuple, int]:
    """A mask (TensorType) broadcast to the scores' ``shape`` as a [B, H, Sq, Sk] view."""
    lay = Layout.of(t).expand(shape).reshape([b, h, shape[-2], shape[-1]])
    dims = [lay.single(i) for i in range(4)]
    return tuple(n for n, _ in dims), tuple(s for _, s in dims), lay.offset


def _operands(c: _Ctx, qk: Node, pv: Node, shapes: list[tuple]):
    def traced(x, transpose=False):
        t = trace(x, c.prod, c.scalar)
        if x.type.rank == 2:
            t.layout = t.layout.unsqueeze(0)
        if transpose:
            t.layout = t.layout.transpose(1, 2)
        return t
    tq, tk, tv = traced(qk.args[0]), traced(qk.args[1], True), traced(pv.args[1])
    if tv.scale != 1.0:
        raise NoMatch("V is scaled")
    z = tq.layout.shape[0]
    cands = [(s[0], s[1]) for s in shapes if len(s) == 4 and s[0] * s[1] == z] + [(1, z)]
    for b, h in dict.fromkeys(cands):
        try:
            q4 = _as4(tq, b, h, False)
            k4, v4 = _as4(tk, b, h, True), _as4(tv, b, h, True)
        except NotAnalysable:
            continue
        if k4[3] != v4[3] or q4[0][1] != h:
            continue
        ops = [Operand(t, x, *lay[:3]) for t, x, lay in ((tq, qk.args[0], q4), (tk, qk.args[1], k4), (tv, pv.args[1], v4))]
        return (b, h), ops
    raise NoMatch("Q, K and V do not split into batch x heads consistently")


# ---- the match -------------------------------------------------------------------------------------
def match_at(c: _Ctx, pv: Node) -> Match:
    """The attention ending in matmul ``pv`` (P @ V), or NoMatch."""
    c.prep = []
    p_nodes, cur = [], pv.args[0]
    sq_sk = tuple(cur.type.shape[-2:])
    while (sm := _softmax(c, cur)) is None:     # reshapes keep row-major order: the ends pin the dims
        n = c.node(cur)
        if n is None or not (_is_reshape(n) or is_copy(n)):
            raise NoMatch("the left operand of P @ V is no softmax")
        p_nodes.append(n)
        cur = n.args[0]
    x, sm_nodes = sm
    if x.type.shape[-1] != sq_sk[1]:
        raise NoMatch("the softmax runs over another dim than the keys")
    qk, steps, chain_nodes = _score_chain(c, x)
    if tuple(qk.out.type.shape[-2:]) != sq_sk:
        raise NoMatch("score dims differ")
    dead = [qk, *chain_nodes, *sm_nodes, *p_nodes]
    inside = {id(n) for n in dead} | {id(pv)}
    for n in dead:
        for o in n.outputs:
            if o.name in c.outputs or any(id(u) not in inside for u in c.users.get(o.name, [])):
                raise NoMatch(f"the intermediate {o.name} ({n.op}) is used outside the attention")
    alpha, adds, bools, causal = _resolve_masks(c, steps)
    mask, mshape, fill = _mask_tensor(c, adds, bools)
    shapes = [tuple(n.out.type.shape) for n in chain_nodes + p_nodes] + [tuple(x.type.shape)]
    (b, h), (q, k, v) = _operands(c, qk, pv, ([mshape] if mask is not None else []) + shapes)
    if mask is not None:
        try:
            mask_view(mask.type, mshape, b, h)
        except NotAnalysable:
            raise NoMatch("the mask does not split into batch x heads") from None
    if q.traced.scale * k.traced.scale * alpha <= 0:
        raise NoMatch("non-positive scale")
    return Match(pv, q, k, v, (b, h), alpha, causal is not None, causal or 0, mask, mshape, fill,
                 list(c.prep), dead, _sdpa_upcast(c, sm_nodes, (q, k, v), pv))


def _sdpa_upcast(c: _Ctx, sm_nodes: list[Node], ops, pv: Node) -> torch.dtype | None:
    """The 16-bit dtype PyTorch's math SDPA upcast this attention from, or None. A traced
    ``scaled_dot_product_attention`` becomes its math path wherever no fused kernel was picked
    at trace time (a CPU graph, a masked one on some GPU paths), and that path casts 16-bit Q, K
    and V to fp32 and the result back: kiln's kernel would run in fp32 and autograd save fp32
    activations (a bf16 BERT layer's training step held 12% more than eager's, which runs the
    fused 16-bit kernel). Its safe softmax (``where(row all -inf, 0, softmax)``) marks the path:
    nothing else writes it; and the result must go back to the inputs' dtype."""
    if not any(n.op in ("aten.any.dim", "aten._safe_softmax.default") for n in sm_nodes):
        return None
    low = {o.traced.src.type.dtype for o in ops}
    if len(low) != 1 or (low := low.pop()) not in (torch.float16, torch.bfloat16) \
            or any(o.x.type.dtype != torch.float32 for o in ops):
        return None
    cur = pv.out
    while cur.name not in c.outputs and len(us := c.users.get(cur.name, [])) == 1:
        n = us[0]
        if is_copy(n):
            return low if n.kwargs.get("dtype") == low and n.out.type.dtype == low else None
        if not _is_reshape(n):
            return None
        cur = n.out
    return None


def find_attention(g: Graph, needs_grad=None, c: _Ctx | None = None) -> list[Match]:
    """Every attention in ``g`` (non-overlapping), in program order. New values are named by
    ``c`` (pass the context that names the rest of the rewrite)."""
    c = c or _Ctx(g, needs_grad)
    found, used = [], set()
    for n in g.nodes:
        if n.op not in ("aten.bmm.default", "aten.mm.default") or n.out.type is None:
            continue
        try:
            m = match_at(c, n)
        except (NoMatch, NotAnalysable):
            continue
        ids = {id(d) for d in m.dead}
        if ids & used:
            continue
        used |= ids
        found.append(m)
    return found

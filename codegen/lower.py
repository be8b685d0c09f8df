"""Lower a fused node to a loop description that every renderer shares: the collapsed x (kept)
and r (reduced) loop dims, each access's strides over them, and an ordered list of scalar
statements tagged with the space they live in ('x': once per row, 'xr': per element)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from kiln.ir import Graph, Node, OpKind, op_kind
from kiln.ir.scalar import Const, E, Ref, lower_pointwise, neutral, reduction_spec
from kiln.passes.loops import dims_of

COMPUTE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def compute_dtype(dt: torch.dtype) -> torch.dtype:
    return COMPUTE.get(dt, dt)


@dataclass
class Access:
    arg: int                    # index into kernel inputs (loads) or outputs (stores)
    xstrides: list[int]         # per collapsed x dim
    rstrides: list[int]         # per collapsed r dim
    dtype: torch.dtype
    var: str                    # loaded variable / stored value
    iota: int | None = None     # a load of an arange view: the value is offset + the address (passes/iota.py)

    @property
    def space(self) -> str:
        return "xr" if any(self.rstrides) else "x"


@dataclass
class Stmt:
    var: str
    expr: object                # E tree with Ref leaves naming earlier vars, or a Reduce
    dtype: torch.dtype
    space: str


@dataclass
class Reduce:
    kind: str                   # sum | mean | max | min | prod | any | all
    src: str                    # variable reduced
    count: int                  # elements per row (for mean)
    acc_dtype: torch.dtype


@dataclass
class LoopKernel:
    name: str
    kind: str
    xsizes: list[int]
    rsizes: list[int]
    loads: list[Access] = field(default_factory=list)
    stores: list[Access] = field(default_factory=list)
    stmts: list[Stmt] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    n_inputs: int = 0
    n_outputs: int = 0
    in_strides: list = field(default_factory=list)    # expected runtime strides per input
    out_strides: list = field(default_factory=list)

    @property
    def xnumel(self) -> int:
        return _prod(self.xsizes)

    @property
    def rnumel(self) -> int:
        return _prod(self.rsizes)


def row_vars(lk: LoopKernel) -> set[str]:
    """A pointwise kernel's loads and statements that read nothing along its innermost dim (a
    row statistic, a row's target, a scalar): the same for every element of a row."""
    last = len(lk.xsizes) - 1
    row = {a.var for a in lk.loads if not a.xstrides[last]}
    for st in lk.stmts:
        if all(r in row for r in refs(st.expr)):
            row.add(st.var)
    return row


def rows_of(lk: LoopKernel) -> LoopKernel:
    """A 2-D pointwise kernel whose elements share a row's work, laid out as a reduction with no
    reduction: the innermost dim walked as the row (in blocks when it is long) and the statements
    that read no element of it computed once a row. Flat, every element redid that work: a
    cross-entropy's gradient (4096 x 50257 bf16, a dozen row statements: the target, its check,
    the scale and its division) ran at 49% of the copy bandwidth on an H200, issue-bound. Left
    flat (returned as is) with fewer than ROW_WORK row statements, or an output that skips the
    innermost dim."""
    if lk.kind != "pointwise" or len(lk.xsizes) < 2 or any(not a.xstrides[-1] for a in lk.stores):
        return lk
    row = row_vars(lk)
    if sum(st.var in row and bool(refs(st.expr)) for st in lk.stmts) < ROW_WORK:
        return lk
    split = lambda a: replace(a, xstrides=a.xstrides[:-1], rstrides=[a.xstrides[-1]])  # noqa: E731
    return replace(lk, kind="reduction", xsizes=lk.xsizes[:-1], rsizes=[lk.xsizes[-1]],
                   loads=[split(a) for a in lk.loads], stores=[split(a) for a in lk.stores],
                   stmts=[replace(st, space="x" if st.var in row else "xr") for st in lk.stmts])


def memory_order(lk: LoopKernel) -> LoopKernel:
    """A pointwise kernel walked in its first output's memory order instead of the logical one.
    An output stored permuted (eager keeps an input's layout through pointwise ops: Llama's q
    after its rotary embedding is [B, H, S, D] over [B, S, H, D] memory) was walked in D-long
    runs a row of S apart; walked by its strides, it and every input laid out alike stream
    contiguously. Dims that become adjacent in every access merge again. Returned as is when
    the output already runs in the logical order."""
    if lk.kind != "pointwise" or not lk.stores or len(lk.xsizes) < 2:
        return lk
    st = lk.stores[0].xstrides
    order = sorted(range(len(st)), key=lambda d: -st[d])        # stable: equal strides keep their order
    if order == list(range(len(st))):
        return lk
    sizes = [lk.xsizes[d] for d in order]
    accesses = [[a.xstrides[d] for d in order] for a in (*lk.loads, *lk.stores)]
    xs, _, strides = _collapse(sizes, set(), accesses)
    moved = lambda a, s: replace(a, xstrides=s)  # noqa: E731
    n = len(lk.loads)
    return replace(lk, xsizes=xs, loads=[moved(a, s) for a, s in zip(lk.loads, strides[:n])],
                   stores=[moved(a, s) for a, s in zip(lk.stores, strides[n:])])


# statements computed from a row's values alone (not constants, not the loads) that make a row
# layout worth it. On an H200: cross-entropy's gradient (13 of them, bf16) 0.395 -> 0.310 ms;
# a row's scale and shift (none) 0.0332 flat, 0.0346 in rows; seven (an exp, a division) 0.0499
# flat, 0.0513 in rows; HF's loss over fp32 logits forced into rows 0.489 -> 0.726 ms (a row
# walked in blocks streams a 4-byte output slower than the flat kernel)
ROW_WORK = 8


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


def _full_strides(shape, strides, dmap, domain) -> list[int]:
    """Per domain dim, the element stride of a value whose dims walk it (``dmap``); a value dim
    that walks several domain dims (a merged view) splits its stride over them, inner fastest."""
    st = [0] * len(domain)
    for s, t, md in zip(shape, strides, dmap):
        if md is None or s == 1:
            continue
        for d in reversed(dims_of(md)):
            st[d] = t
            t *= domain[d]
    return st


def _collapse(domain, rdims, accesses) -> tuple[list[int], list[int], list[list[int]]]:
    """Merge adjacent loop dims that every access walks contiguously; returns (xsizes, rsizes,
    per access [x strides..., r strides...])."""
    def merge(dims):
        groups: list[list[int]] = []
        for d in dims:
            if groups:
                prev = groups[-1][-1]
                if all(a[prev] == a[d] * domain[d] for a in accesses):
                    groups[-1].append(d)
                    continue
            groups.append([d])
        return groups
    xd = merge([d for d in range(len(domain)) if d not in rdims and domain[d] != 1])
    rd = merge([d for d in rdims if domain[d] != 1])
    sizes = lambda gs: [_prod(domain[d] for d in g) for g in gs]  # noqa: E731
    strides = [[a[g[-1]] for g in xd] + [a[g[-1]] for g in rd] for a in accesses]
    return sizes(xd), sizes(rd), strides


def lower(node: Node) -> LoopKernel:
    body: Graph = node.body
    plan = node.attrs["plan"]
    domain, rdims, maps = plan["domain"], set(plan["reduce_dims"]), plan["maps"]
    nd = len(domain)
    leaves = {v.name: i for i, v in enumerate(body.inputs)}
    iota = {int(i): int(off) for i, off in node.attrs.get("iota", ())}
    loads: dict[tuple, Access] = {}
    raw_load_strides: list[list[int]] = []
    stmts: list[Stmt] = []
    var_of: dict[str, str] = {}       # IR value name -> kernel variable
    space_of: dict[str, str] = {}
    counter = iter(range(1 << 30))

    def space(full):
        return "xr" if any(full[d] for d in rdims) or any(
            full[d] for d in range(nd) if d in rdims) else "x"

    def load(v, dmap):
        full = _full_strides(v.type.shape, v.type.strides, dmap, domain)
        key = (v.name, tuple(full))
        if key not in loads:
            loads[key] = Access(leaves[v.name], [], [], v.type.dtype, f"in{leaves[v.name]}_{len(loads)}",
                                iota.get(leaves[v.name]))
            raw_load_strides.append(full)
            space_of[loads[key].var] = "xr" if any(full[d] for d in rdims) else "x"
        return loads[key].var

    def operand_map(v, out_map, out_shape):
        off = len(out_shape) - v.type.rank
        return [out_map[off + i] if v.type.shape[i] == out_shape[off + i] and v.type.shape[i] != 1 else None
                for i in range(v.type.rank)]

    def rewrite(e, out_map, out_shape, node_args):
        """Replace Refs to IR values with kernel variables (loading group inputs as needed)."""
        if isinstance(e, Ref):
            if e.name in leaves:
                v = next(a for a in node_args if getattr(a, "name", None) == e.name)
                return Ref(load(v, operand_map(v, out_map, out_shape)), e.dtype)
            return Ref(var_of[e.name], e.dtype)
        if isinstance(e, E):
            return E(e.op, tuple(rewrite(a, out_map, out_shape, node_args) for a in e.args), e.dtype)
        return e

    def sp(e) -> str:
        if isinstance(e, Ref):
            return space_of[e.name]
        if isinstance(e, E):
            return "xr" if any(sp(a) == "xr" for a in e.args) else "x"
        return "x"

    ops = []
    for n in body.nodes:
        v = n.out
        kind = op_kind(n.op)
        ops.append(n.op)
        if kind == OpKind.VIEW:
            var_of[v.name] = var_of[n.args[0].name]
            continue
        out_map = maps[v.name]
        name = f"t{next(counter)}"
        if kind == OpKind.REDUCTION:
            rk, x, _, _ = reduction_spec(n)
            src = var_of[x.name] if x.name not in leaves else load(x, list(range(nd)) if True else None)
            acc = compute_dtype(v.type.dtype) if rk not in ("any", "all") else torch.bool
            if rk in ("sum", "mean", "prod") and acc == torch.bool:
                acc = torch.int64
            stmts.append(Stmt(name, Reduce(rk, src, _prod(domain[d] for d in rdims), acc), v.type.dtype, "x"))
            space_of[name] = "x"
        else:
            e = rewrite(lower_pointwise(n), out_map, v.type.shape, n.inputs())
            s = sp(e)
            stmts.append(Stmt(name, e, v.type.dtype, s))
            space_of[name] = s
        var_of[v.name] = name
    store_full = [_full_strides(v.type.shape, v.type.strides, maps[v.name], domain) for v in body.outputs]
    xs, rs, strides = _collapse(domain, sorted(rdims), raw_load_strides + store_full)
    nx_ = len(xs)
    load_list = list(loads.values())
    for a, st in zip(load_list, strides):
        a.xstrides, a.rstrides = st[:nx_], st[nx_:]
    stores = [Access(i, st[:nx_], st[nx_:], v.type.dtype, var_of[v.name])
              for i, (v, st) in enumerate(zip(body.outputs, strides[len(load_list):]))]
    stored = {a.var for a in stores}
    stmts = exact_divisions(fold_tanh(fold_erfc(stmts, stored), stored))
    return LoopKernel(node.attrs["name"], plan["kind"], xs, rs, load_list, stores, stmts, ops,
                      len(body.inputs), len(body.outputs),
                      [list(v.type.strides) for v in body.inputs], [list(v.type.strides) for v in body.outputs])


def refs(e) -> list[str]:
    """Variables an expression (or a Reduce) reads."""
    if isinstance(e, Ref):
        return [e.name]
    if isinstance(e, E):
        return [r for a in e.args for r in refs(a)]
    if isinstance(e, Reduce):
        return [e.src]
    return []


def _one(e) -> bool:
    return isinstance(e, Const) and not isinstance(e.value, bool) and float(e.value) == 1.0


def _fold_one_plus(stmts: list[Stmt], stored: set[str], fn: str, ops: tuple, rewrite) -> list[Stmt]:
    """Statements ``f(x) + 1`` or ``1 + f(x)`` (and ``1 - f(x)`` where ``ops`` has "sub"), with
    ``f`` the op ``fn`` in fp32 and its value read nowhere else, become ``rewrite(op, x, dtype)``;
    the ``f`` statement goes."""
    uses: dict[str, int] = {}
    for st in stmts:
        for r in refs(st.expr):
            uses[r] = uses.get(r, 0) + 1
    by_var = {st.var: st for st in stmts}
    dropped: set[str] = set()
    out = []
    for st in stmts:
        e = st.expr
        new = None
        if isinstance(e, E) and e.op in ops and compute_dtype(e.dtype) == torch.float32:
            a, b = e.args
            u = a if e.op == "add" and _one(b) else b if _one(a) else None
            src = by_var.get(u.name) if isinstance(u, Ref) else None
            if (src is not None and isinstance(src.expr, E) and src.expr.op == fn and uses[u.name] == 1
                    and u.name not in stored and compute_dtype(src.expr.dtype) == torch.float32):
                new = Stmt(st.var, rewrite(e.op, src.expr.args[0], e.dtype), st.dtype, st.space)
                dropped.add(u.name)
        out.append(new or st)
    return [st for st in out if st.var not in dropped]


def fold_erfc(stmts: list[Stmt], stored: set[str]) -> list[Stmt]:
    """Where nothing else reads the erf, ``erf(x) + 1`` (GELU's CDF, forward and gelu_backward)
    becomes ``erfc(-x)`` and ``1 - erf(x)`` becomes ``erfc(x)``. For x < 0 the sum cancels to a
    few ulp of 1 (GELU's negative tail came out 0) where erfc keeps it, and erfc has a cheaper
    GPU form than erf (codegen/triton_gen.py's ``_erfc``)."""
    return _fold_one_plus(stmts, stored, "erf", ("add", "sub"), lambda op, x, dt: E(
        "erfc", (E("neg", (x,), x.dtype) if op == "add" else x,), dt))


def fold_tanh(stmts: list[Stmt], stored: set[str]) -> list[Stmt]:
    """Where nothing else reads the tanh, ``tanh(y) + 1`` (the tanh GELU as GPT-2 writes it,
    0.5 * x * (1 + tanh(...))) becomes ``2 * sigmoid(2 * y)``, the same value: for y < 0 the sum
    cancels where the sigmoid keeps its digits, and it is cheaper (one exp and one reciprocal
    where tanh takes a series, an exp and a division, both sides of a select, on a GPU)."""
    def rewrite(op, y, dt):
        two = Const(2.0, dt)
        return E("mul", (E("sigmoid", (E("mul", (y, two), dt),), dt), two), dt)
    return _fold_one_plus(stmts, stored, "tanh", ("add",), rewrite)


# ops whose result jumps where their operand crosses a threshold: an ulp there can move it a whole step
ROUNDING = {"floor", "ceil", "trunc", "round", "eq", "ne", "lt", "le", "gt", "ge"}


def exact_divisions(stmts: list[Stmt]) -> list[Stmt]:
    """Divisions whose value reaches a rounding op, a comparison or an integer cast, through any
    chain of ops (floor(a / b), (a / b + 0.5).floor(), a / b > t), become ``truediv_rn``:
    Triton's fp32 ``/`` is div.full.f32, within 2 ulp of eager's IEEE quotient, enough to put
    floor(a / b) one below eager's where the quotient is just over an integer. The others keep
    the fast form: an exact division in softmax's normalisation cost its kernel 12% on an H200
    (bench/RESULTS.md)."""
    tainted: set[str] = set()          # statements whose value reaches a rounding op
    out = []
    for st in reversed(stmts):
        e = st.expr if isinstance(st.expr, Reduce) else _exact(st.expr, st.var in tainted, tainted)
        if isinstance(st.expr, Reduce) and st.var in tainted:
            tainted.add(st.expr.src)
        out.append(st if e is st.expr else Stmt(st.var, e, st.dtype, st.space))
    return out[::-1]


def _exact(e, under: bool, tainted: set[str]):
    if isinstance(e, Ref):
        if under:
            tainted.add(e.name)
        return e
    if not isinstance(e, E):
        return e
    inner = under or e.op in ROUNDING or (e.op in ("cast", "convert") and not e.dtype.is_floating_point
                                          and e.dtype != torch.bool)
    args = tuple(_exact(a, inner, tainted) for a in e.args)
    op = "truediv_rn" if e.op == "truediv" and under else e.op
    return e if op == e.op and all(x is y for x, y in zip(args, e.args)) else E(op, args, e.dtype)


def neutral_of(r: Reduce):
    return neutral(r.kind, r.acc_dtype)


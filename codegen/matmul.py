"""Render a kiln.matmul node (passes/matmul.py decided what it computes) as Triton source: a tiled
tl.dot kernel and, for M <= 16, a GEMV kernel that streams B with wide loads; both share the
prologue (pointwise work on each A tile) and the epilogue (the absorbed pointwise groups, on the
fp32 accumulator). Expressions are lowered by codegen.lower and rendered by TritonRenderer, the
same path loop kernels take, so an epilogue computes exactly what the group would.

One source serves three modes (a constexpr): 0 computes and finishes a tile; 1 computes a
K-slice and stores fp32 partials (split-K); 2 sums partials, or cuBLAS products, from the
workspace pointers and finishes the tile, which is how an ATen matmul keeps its fused epilogue."""
from __future__ import annotations

import torch

from kiln.ir import Graph, Node, Value
from kiln.ir.scalar import Const, E, Ref
from .kernel import Kernel
from .lower import LoopKernel, compute_dtype, lower
from .scalar_render import TL, TritonRenderer
from .templates import ENV
from .triton_gen import HELPERS

ORDER_VIEWS = {"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default",
               "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default",
               "aten.alias.default"}
LOW = (torch.float16, torch.bfloat16)


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


def _decompose(var: str, sizes: list[int], prefix: str, start: int) -> list[str]:
    lines = []
    for i, s in enumerate(sizes):
        inner = _prod(sizes[i + 1:])
        e = var if inner == 1 else f"({var} // {inner})"
        if i > 0:
            e = f"({e} % {s})"
        lines.append(f"{prefix}{start + i} = {e}")
    return lines


def index_lines(sizes: list[int], ncols: int, row: str, col: str, prefix: str) -> tuple[list[str], list[str]]:
    """Lines defining ``prefix0..`` (the collapsed loop indices of a group's domain) at the tile
    element (row, col) of a [rows, ncols] row-major space; split into lines that use only the row
    and lines that need the column (those go inside a K loop)."""
    for s in range(len(sizes) + 1):
        if _prod(sizes[s:]) == ncols:
            return _decompose(row, sizes[:s], prefix, 0), _decompose(col, sizes[s:], prefix, s)
    return [], [f"{prefix}x = {row} * {ncols} + {col}"] + _decompose(f"{prefix}x", sizes, prefix, 0)


def _addr(strides: list[int], prefix: str) -> str:
    terms = [f"{prefix}{i} * {s}" if s != 1 else f"{prefix}{i}" for i, s in enumerate(strides) if s]
    return " + ".join(terms) if terms else "0"


def _rename(e, prefix: str):
    if isinstance(e, Ref):
        return Ref(prefix + e.name, e.dtype)
    if isinstance(e, E):
        return E(e.op, tuple(_rename(a, prefix) for a in e.args), e.dtype)
    return e


def _bind(src: str, dt: torch.dtype) -> str:
    """A value kept in registers, read as the stored tensor would be (16-bit values round)."""
    return f"{src}.to({TL[dt]}).to(tl.float32)" if dt in LOW else src


class _Group:
    """One pointwise group rendered at tile elements: its loads, statements and stores."""

    def __init__(self, node: Node, prefix: str, r: TritonRenderer):
        self.node, self.prefix, self.r = node, prefix, r
        self.lk: LoopKernel = lower(node)

    def lines(self, row: str, col: str, ncols: int, bound: dict, arg_of: dict, out_of: dict,
              mask: str, shape: str, descs: dict | None = None) -> tuple[list[str], list[str]]:
        """(row-only lines, per-element lines). ``bound``: outer value name -> register variable
        (values in the tile's linear order); others load from kernel argument ``arg_of[name]``;
        outputs in ``out_of`` are stored, those in ``descs`` (name -> TMA descriptor) through it
        as one tile (the persistent TMA kernel; see linear_store)."""
        lk, p = self.lk, self.prefix
        rows, cols = index_lines(lk.xsizes, ncols, row, col, p + "x")
        body = list(cols)
        for a in lk.loads:
            v = self.node.args[a.arg]
            if v.name in bound:
                body.append(f"{p}{a.var} = {_bind(bound[v.name], v.type.dtype)}")
                continue
            ptr = f"in{arg_of[v.name]} + ({_addr(a.xstrides, p + 'x')}) + {shape}"
            ld = f"tl.load({ptr})" if mask is None else f"tl.load({ptr}, mask={mask}, other=0)"
            body.append(f"{p}{a.var} = {ld}" + (f".to({TL[compute_dtype(a.dtype)]})"
                                                 if compute_dtype(a.dtype) != a.dtype else ""))
        for s in lk.stmts:
            if isinstance(s.expr, Const):
                body.append(f"{p}{s.var} = tl.full([1, 1], {self.r.literal(s.expr)}, {TL[compute_dtype(s.dtype)]})")
            else:
                body.append(f"{p}{s.var} = {self.r.render(_rename(s.expr, p))}")
        for a in lk.stores:
            v = self.node.outputs[a.arg]
            if descs and v.name in descs:
                body.append(_desc_store(descs[v.name], f"{p}{a.var}", a.dtype))
            elif v.name in out_of:
                body.append(f"tl.store(out{out_of[v.name]} + ({_addr(a.xstrides, p + 'x')}) + {shape}, "
                            f"{p}{a.var}.to({TL[a.dtype]}), mask={mask})")
        return rows, body

    def linear_store(self, v: Value) -> bool:
        """Does the group store ``v`` at its elements' linear index (the product's row-major
        tile order), so a [M, n] descriptor over it can take the tile as it is?"""
        a = next(a for a in self.lk.stores if self.node.outputs[a.arg].name == v.name)
        want, st = [], 1
        for n in reversed(self.lk.xsizes):
            want.append(st)
            st *= n
        return all(n == 1 or x == w for n, x, w in zip(self.lk.xsizes, a.xstrides, reversed(want)))

    def var_of(self, v: Value) -> str:
        i = next(i for i, o in enumerate(self.node.outputs) if o.name == v.name)
        return self.prefix + self.lk.stores[i].var


def _desc_store(desc: str, val: str, dt: torch.dtype) -> str:
    return f"{desc}.store([pid_m * BLOCK_M, pid_n * BLOCK_N], tl.broadcast_to({val}.to({TL[dt]}), (BLOCK_M, BLOCK_N)))"


def _seg_epilogue(seg: dict, body: Graph, r: TritonRenderer, arg_of: dict, out_of: dict, M: int,
                  s: int, descs: dict | None = None) -> list[str]:
    """The segment's epilogue lines; outputs named in ``descs`` are stored through those TMA
    descriptors (the persistent TMA kernel's variant)."""
    nodes = {o.name: n for n in body.nodes for o in n.outputs}
    bound = {name: f"acc{p}" for p, name in enumerate(seg["acc"])}
    lin = set(seg["lin"])
    lines: list[str] = []
    count = 0
    for name in seg["stores"]:
        if name in bound:
            dt = nodes[name].out.type.dtype
            if descs and name in descs:
                lines.append(_desc_store(descs[name], f"acc{seg['acc'].index(name)}", dt))
            else:
                lines.append(f"tl.store(out{out_of[name]} + (r * {seg['n']} + rn2) + ezero, "
                             f"acc{seg['acc'].index(name)}.to({TL[dt]}), mask=emask)")
    groups = set(seg["groups"])
    for n in body.nodes:
        if n.op in ORDER_VIEWS and n.args[0].name in bound and n.out.name in lin:
            bound[n.out.name] = bound[n.args[0].name]
        elif n.op == "kiln.fused" and n.outputs[0].name in groups:
            g = _Group(n, f"s{s}g{count}_", r)
            count += 1
            rows, per = g.lines("r", "rn2", seg["n"], bound, arg_of, out_of, "emask", "ezero", descs)
            lines += rows + per
            for o in n.outputs:
                if o.name in lin:
                    bound[o.name] = g.var_of(o)
    return lines


def _prologue(plan: dict, body: Graph, r: TritonRenderer, arg_of: dict, dtype) -> dict | None:
    if plan["prologue"] is None:
        return None
    node = next(n for n in body.nodes if n.op == "kiln.fused" and n.outputs[0].name == plan["prologue"]["group"])
    g = _Group(node, "pro_", r)
    rows, per = {}, {}
    for even in (True, False):
        rows[even], per[even] = g.lines("ra", "kk", plan["K"], {}, arg_of, {}, None if even else "kmask_a", "azero")
        a = g.var_of(node.outputs[0])
        per[even].append(f"a = {a}.to({TL[dtype]})" if even else
                         f"a = tl.where(kmask_a, {a}, 0).to({TL[dtype]})")
    return {"rows": rows[True], "even": per[True], "odd": per[False]}


def render(node: Node) -> tuple[str, dict]:
    plan, body = node.attrs["plan"], node.body
    name = node.attrs["name"]
    r = TritonRenderer()
    arg_of = {v.name: i for i, v in enumerate(node.args)}
    out_of = {v.name: i for i, v in enumerate(node.outputs)}
    nodes = {o.name: n for n in body.nodes for o in n.outputs}
    mm0 = nodes[plan["segments"][0]["acc"][0]]
    dtype = mm0.out.type.dtype
    a_t = mm0.args[0].type
    M, K, bt = plan["M"], plan["K"], plan["batch"]
    a = None if plan["a"] is None else {"ptr": f"in{plan['a']}", "sb": a_t.strides[0] if bt > 1 or a_t.rank == 3 else 0,
                                        "sm": a_t.strides[-2], "sk": a_t.strides[-1]}
    pro = _prologue(plan, body, r, arg_of, dtype)
    segs, ws, t_start = [], [], "0"
    for s, seg in enumerate(plan["segments"]):
        bs = []
        for p, acc in enumerate(seg["acc"]):
            bt_ = nodes[acc].args[1].type
            bs.append({"ptr": f"in{seg['b'][p]}", "sb": bt_.strides[0] if bt_.rank == 3 else 0,
                       "sk": bt_.strides[-2], "sn": bt_.strides[-1], "ws": f"ws{len(ws)}"})
            ws.append(f"ws{len(ws)}")
        t_end = f"{t_start} + ({seg['n']} + BLOCK_N - 1) // BLOCK_N"
        segs.append({"n": seg["n"], "bs": bs, "t_start": t_start, "t_end": t_end,
                     "epi": _seg_epilogue(seg, body, r, arg_of, out_of, M, s)})
        t_start = f"({t_end})"
    params = [f"in{i}" for i in range(len(node.args))] + [f"out{i}" for i in range(len(node.outputs))] + ws
    spans = [v.type.storage_bytes // max(v.type.itemsize, 1) for v in (*node.args, *node.outputs)]
    wide = max(spans + [bt * M * max(s["n"] for s in segs)]) >= 2**31 - 1
    prec = ""
    if dtype == torch.float32:
        prec = ", input_precision='tf32'" if torch.backends.cuda.matmul.allow_tf32 else ", input_precision='ieee'"
    tma = _tma_layout(plan, a_t, segs, nodes, pro)
    if tma is not None:
        stores = _tma_stores(plan["segments"][0], node, body, r, M) if tma["pair"] else []
        tma["stores"] = [out_of[name] for name in stores]
        segs[0]["epi_tma"] = _seg_epilogue(plan["segments"][0], body, r, arg_of, out_of, M, 0,
                                           {name: f"o_desc{out_of[name]}" for name in stores})
    ops = [n.op for n in body.all_nodes() if not n.op.startswith("kiln.")]
    helpers = [HELPERS[h] for h in sorted(r.helpers)]
    src = ENV.get_template("matmul_kernel.py.j2").render(
        name=name, ops=list(dict.fromkeys(ops)), helpers=helpers, params=params, M=M, K=K, B=bt, a=a, pro=pro,
        segments=segs, dtype=TL[dtype], prec=prec, wide=wide, gemv=plan["gemv"], tma=tma)
    return src, {"ops": list(dict.fromkeys(ops)), "tma": tma}


def _tma_layout(plan: dict, a_t, segs: list[dict], nodes: dict, pro) -> dict | None:
    """How A and each B are read through TMA tensor descriptors (Hopper and later), or None when
    the plan does not allow it: one segment (one tile space), no batch, no prologue (A in memory),
    every operand 2-D with a unit stride along one dimension and 16-byte-aligned rows. Each B is
    read as stored: K-major (an nn.Linear weight, [N, K]) or N-major ([K, N]). Sets ``kmajor`` on
    the segment's B entries for the template. ``pair``: two K-major weights alike, which the
    launcher may read through one 3-D descriptor (their distance in memory as its outer stride)."""
    if len(plan["segments"]) != 1 or plan["batch"] != 1 or plan["a"] is None or pro is not None:
        return None
    isz = a_t.itemsize
    if a_t.rank != 2 or a_t.strides[1] != 1 or a_t.strides[0] * isz % 16:
        return None
    seg = plan["segments"][0]
    bs = []
    for acc, b in zip(seg["acc"], segs[0]["bs"]):
        t = nodes[acc].args[1].type
        if t.rank != 2 or t.dtype != a_t.dtype:
            return None
        sk, sn = t.strides
        if sk == 1 and sn * isz % 16 == 0:
            b["kmajor"] = True
            bs.append({"stride": sn, "kmajor": True})
        elif sn == 1 and sk * isz % 16 == 0:
            b["kmajor"] = False
            bs.append({"stride": sk, "kmajor": False})
        else:
            return None
    # two K-major weights of one shape: read as one [2, N, K] view when their distance allows
    pair = len(bs) == 2 and all(b["kmajor"] for b in bs) and bs[0]["stride"] == bs[1]["stride"]
    return {"a_stride": a_t.strides[0], "b": bs, "pair": pair}


def _tma_stores(seg: dict, node: Node, body: Graph, r: TritonRenderer, M: int) -> list[str]:
    """The segment's outputs the TMA kernel stores through descriptors: dense [M, n] row-major
    tensors (any shape over those elements) written at the tile's linear index, rows 16-byte
    aligned. A TMA store writes the whole tile from shared memory at once (clipped at the edges)
    instead of masked stores from registers: on an H200 Llama's gate/up with SwiGLU ran 0.568 ms
    against 0.586 (bench/probe_pair_rows.py). Only for a weight pair (render): the single
    product's 128x256 tile with its 3 stages and a store buffer asked 245,784 bytes of shared
    memory, over the H200's 232,448."""
    outs = {v.name: v for v in node.outputs}
    groups = {n.outputs[0].name: n for n in body.nodes if n.op == "kiln.fused"}
    names = []
    for name in seg["stores"]:
        v = outs.get(name)
        t = None if v is None else v.type
        if t is None or t.numel != M * seg["n"] or not t.is_contiguous or seg["n"] * t.itemsize % 16:
            continue
        if name in seg["acc"]:
            names.append(name)
            continue
        g = next((n for n in groups.values() if any(o.name == name for o in n.outputs)), None)
        if g is not None and g.outputs[0].name in seg["groups"] and _Group(g, "", r).linear_store(v):
            names.append(name)
    return names


def _inplace(seg: dict, node: Node, nodes: dict) -> bool:
    """Whether the cuBLAS path may write the segment's first product into its one output and run
    the epilogue over it in place (each element is read and written by the same program, at the
    same offset): the output is stored in the products' linear order, densely, in their dtype. It
    saves a product-sized temporary (eager's ``addmm`` writes its output directly)."""
    if len(seg["stores"]) != 1 or seg["stores"][0] not in seg["lin"] or not seg["groups"]:
        return False
    out = node.outputs[seg["outputs"][0]].type
    prod = nodes[seg["acc"][0]].out.type
    return out.is_contiguous and out.offset == 0 and out.dtype == prod.dtype and out.numel == prod.numel


CASTS = {"aten._to_copy.default", "prims.convert_element_type.default"}


def _bias(seg: dict, node: Node, nodes: dict, full: bool = False) -> list[tuple[int, int]] | None:
    """Per product of the segment, (the kiln.matmul argument holding its bias, its output) when
    the segment's whole epilogue is ``product + bias`` for each product (a [n] vector in the
    product's dtype; casts to wider floats, views and scalings by 1 around either, as capture's
    addmm decomposition spells it, over one or more groups), each stored densely in the
    product's order and dtype. The cuBLAS path then runs ``addmm``, whose bias epilogue adds it
    as the product is written, where mm plus the epilogue pass would read and write the product
    once more (eager's addmm does the same, with one rounding instead of two). ``full``: the
    addend is instead a dense tensor of the product's size (a residual), which cuBLAS adds as
    C in C += A @ B where the output is written over it (matmul_launch)."""
    prods = [nodes[a] for a in seg["acc"]]
    if not seg["groups"] or len(seg["stores"]) != len(prods) or any(p.op != "aten.mm.default" for p in prods) \
            or not all(name in seg["lin"] for name in seg["stores"]):
        return None
    pt = prods[0].out.type
    arg_of = {v.name: i for i, v in enumerate(node.args)}
    wide = (pt.dtype, torch.float32, torch.float64)
    tag: dict[str, object] = {p.out.name: ("P", j) for j, p in enumerate(prods)}    # outer names
    for n in node.body.nodes:       # order-keeping views between a product and its groups
        if n.op in ORDER_VIEWS and n.out.name in seg["lin"] and isinstance(n.args[0], Value) \
                and n.args[0].name in tag:
            tag[n.out.name] = tag[n.args[0].name]
    for gname in seg["groups"]:
        grp = nodes[gname]
        if grp.op != "kiln.fused" or grp.body is None:
            return None
        inner: dict[str, object] = {}
        for iv, ov in zip(grp.body.inputs, grp.args):
            if ov.name in tag:
                inner[iv.name] = tag[ov.name]
            elif ov.name in arg_of and ov.type.dtype == pt.dtype and (
                    ov.type.numel == pt.numel and ov.type.is_contiguous if full
                    else ov.type.shape in ((seg["n"],), (1, seg["n"]))):
                inner[iv.name] = arg_of[ov.name]            # a bias (or residual) candidate
            else:
                return None
        for n in grp.body.nodes:
            a = n.args
            src = inner.get(a[0].name) if a and isinstance(a[0], Value) else None
            if src is None or len(n.outputs) != 1:
                return None
            if n.op in CASTS and n.out.type.dtype in wide or n.op in ORDER_VIEWS and len(a) == 2 \
                    or n.op == "aten.mul.Tensor" and len(a) == 2 and type(a[1]) in (int, float) and a[1] == 1:
                inner[n.out.name] = src
            elif n.op == "aten.add.Tensor" and len(a) == 2 and not n.kwargs and isinstance(a[1], Value):
                pair = (src, inner.get(a[1].name))
                prod = next((t for t in pair if isinstance(t, tuple) and t[0] == "P"), None)
                bias = next((t for t in pair if type(t) is int), None)      # noqa: E721 - not bool
                if prod is None or bias is None:
                    return None
                inner[n.out.name] = ("S", prod[1], bias)
            else:
                return None
        for iv, ov in zip(grp.body.outputs, grp.outputs):
            tag[ov.name] = inner[iv.name]
    found: dict[int, tuple[int, int]] = {}
    for name, oi in zip(seg["stores"], seg["outputs"]):
        t, out = tag.get(name), node.outputs[oi].type
        if not (isinstance(t, tuple) and t[0] == "S") or t[1] in found or not (
                out.is_contiguous and out.offset == 0 and out.dtype == pt.dtype and out.numel == pt.numel):
            return None
        found[t[1]] = (t[2], oi)
    return [found[j] for j in range(len(prods))] if len(found) == len(prods) else None


def build(node: Node, target: str, cache_dir: str, autotune: bool = False) -> Kernel:
    plan = node.attrs["plan"]
    src, extra = render(node)
    body = node.body
    nodes = {o.name: n for n in body.nodes for o in n.outputs}
    segs = [{"n": s["n"], "b": s["b"], "P": len(s["acc"]), "out": s["outputs"][0] if s["outputs"] else None,
             "outs": s["outputs"], "direct": not s["groups"] and s["stores"] == s["acc"],
             "inplace": _inplace(s, node, nodes), "bias": _bias(s, node, nodes) if plan["batch"] == 1 else None,
             "residual": _bias(s, node, nodes, full=True) if plan["batch"] == 1 and len(s["acc"]) == 1 else None}
            for s in plan["segments"]]
    if not all(s["direct"] or s["bias"] is not None for s in segs):
        for s in segs:          # the epilogue pass runs over every segment's product: all or none
            s["bias"] = None
    first = plan["segments"][0]
    # the cuBLAS path needs no epilogue pass: products written straight out (or through addmm)
    identity = all(s["direct"] or s["bias"] is not None for s in segs) and plan["prologue"] is None
    meta = {"launcher": "matmul", "cache_dir": cache_dir, "autotune": bool(autotune),
            "in_strides": [list(v.type.strides) for v in node.args],
            "M": plan["M"], "K": plan["K"], "batch": plan["batch"], "a": plan["a"], "segments": segs,
            "gemv": plan["gemv"], "identity": identity, "prologue": plan["prologue"] is not None,
            "tma": extra["tma"],
            "dtype": str(nodes[first["acc"][0]].out.type.dtype).removeprefix("torch.")}
    return Kernel(node.attrs["name"], "matmul", "triton", extra["ops"], src, node.attrs["name"], meta)

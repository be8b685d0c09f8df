"""Matmul fusion (target triton): every ATen mm/bmm becomes one ``kiln.matmul`` node that also
does the work that would otherwise re-read its output or its input.

- Epilogue: the pointwise groups (``kiln.fused``, from passes.fuse) that read the product element
  for element (bias, activation, residual, scaling, casts, and chains of them) are computed on
  the accumulator tile; only values used outside the node are stored.
- Prologue: a pointwise group producing A for this node alone (a cast, a scale) is computed on
  each A tile as it is loaded, so its output never reaches memory.
- Horizontal: matmuls reading the same A with weights (graph inputs or constants, possibly
  permuted views) run as one launch; each is a segment of the N tiles (Q/K/V). Matmuls whose
  products meet in one epilogue group (SwiGLU's silu(gate) * up) share a segment with one
  accumulator each, so the [M, 2N] intermediate never exists. At cuBLAS's sizes, plain products
  (no epilogue) are split instead: each stays with cuBLAS, and two of one weight shape (GQA's k
  and v) run as one launch.

Values "in the linear order" of a segment are those whose row-major element ``x`` is the
product's element ``x``: the product, its reshapes, and outputs of absorbed groups that walk
their domain in order. An epilogue group is absorbed when it reads such values only at its own
element and reads nothing else computed from the products. The decisions are recorded in the
node's ``plan``; codegen/matmul.py renders them."""
from __future__ import annotations

import networkx as nx
import torch

from kiln.ir import Graph, Node, Value
from .loops import _right_align, dims_of

MATMULS = {"aten.mm.default": 2, "aten.bmm.default": 3}
ORDER_VIEWS = {"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default",
               "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default",
               "aten.alias.default"}
LEAF_VIEWS = ORDER_VIEWS | {"aten.permute.default", "aten.t.default", "aten.transpose.int",
                            "aten.expand.default"}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMV_MAX_M = 16
# Products at least this tall and this large run on cuBLAS unless their epilogue needs kiln's
# kernel (codegen/matmul_config.py measures the line); plain products sharing A are then split
# into their own launches here, so each can take the faster of the two.
CUBLAS_MIN_M = 1024
CUBLAS_MIN_FLOPS = 2 ** 35
PROLOGUE_MAX_OPS = 8


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _eligible(n: Node) -> bool:
    if n.op not in MATMULS or len(n.args) != 2 or n.kwargs:
        return False
    a, b = n.args
    if not all(isinstance(v, Value) and v.type is not None for v in (a, b, n.out)):
        return False
    return (a.type.dtype == b.type.dtype == n.out.type.dtype and a.type.dtype in DTYPES
            and n.out.type.device in ("cuda", "cpu") and n.out.type.numel > 0 and a.type.shape[-1] > 0
            and n.out.type.is_contiguous)


def _pointwise_group(n: Node) -> bool:
    return n.op == "kiln.fused" and n.attrs.get("kind") == "pointwise" and "plan" in n.attrs


def _walks_in_order(v: Value, n: Node, maps: dict, domain) -> bool:
    """Does node ``n`` of a group body read leaf ``v`` at the group's own element, in row-major
    order of the domain (so the element is the linear index of the matmul tile)?"""
    ident = [i for i, s in enumerate(domain) if s != 1]
    if [s for s in v.type.shape if s != 1] != [s for s in domain if s != 1]:
        return False
    om = maps.get(n.out.name)
    if om is None or _walked(om) != ident:
        return False
    return _walked(_right_align(v.type.shape, om, n.out.type.shape)) == ident


def _walked(dmap) -> list[int]:
    """The domain dims a dim map walks, in the value's dim order (merged dims expanded)."""
    return [d for md in dmap for d in dims_of(md)]


def _in_order_output(v: Value, plan: dict) -> bool:
    m = plan["maps"].get(v.name)
    dom = plan["domain"]
    return (m is not None and _walked(m) == [i for i, s in enumerate(dom) if s != 1]
            and [s for s in v.type.shape if s != 1] == [s for s in dom if s != 1])


class _Analysis:
    def __init__(self, g: Graph):
        self.g = g
        self.pos = {id(n): i for i, n in enumerate(g.nodes)}
        self.prod = g.producers()
        self.users = g.users()
        self.outs = {v.name for v in g.output_values()}
        self.leaves = {v.name for v in g.leaves()}

    def weight_like(self, v: Value) -> bool:
        """A graph input or constant, or a view of one: nothing computed at run time."""
        while v.name not in self.leaves:
            p = self.prod.get(v.name)
            if p is None or p.op not in LEAF_VIEWS or not isinstance(p.args[0], Value):
                return False
            v = p.args[0]
        return True

    def descendants(self, names: set[str]) -> set[str]:
        seen, stack = set(names), list(names)
        while stack:
            for u in self.users.get(stack.pop(), []):
                for o in u.outputs:
                    if o.name not in seen:
                        seen.add(o.name)
                        stack.append(o.name)
        return seen

    def epilogue(self, mms: list[Node], desc: set[str], taken: set[int]):
        """Nodes absorbed after the products of one segment (views and groups, program order),
        the values to store, the values in linear order, and the absorbed reshapes whose output
        is still read outside (they stay in the graph too, reading a stored value)."""
        total = mms[0].out.type.numel
        lin = {m.out.name for m in mms}
        absorbed: list[Node] = []
        start = min(self.pos[id(m)] for m in mms)
        for u in self.g.nodes[start:]:
            if id(u) in taken or not any(v.name in lin for v in u.inputs()):
                continue
            if u.op in ORDER_VIEWS and isinstance(u.args[0], Value) and u.args[0].name in lin:
                absorbed.append(u)
                lin.add(u.out.name)
            elif self.absorbable(u, lin, desc, total):
                absorbed.append(u)
                lin.update(o.name for o in u.outputs if _in_order_output(o, u.attrs["plan"]))
        inside = {id(n) for n in absorbed} | {id(m) for m in mms}
        made = [v for n in (*mms, *absorbed) for v in n.outputs]
        escaping = {v.name for v in made if v.name in self.outs or
                    any(id(u) not in inside for u in self.users.get(v.name, []))}
        for n in reversed(absorbed):         # a reshape used outside stays outside: store its source
            if n.op in ORDER_VIEWS and n.out.name in escaping:
                escaping.add(n.args[0].name)
        stored = [v.name for v in made if v.name in escaping and self.prod[v.name].op not in ORDER_VIEWS]
        kept = {id(n) for n in absorbed if n.op in ORDER_VIEWS and n.out.name in escaping}
        return absorbed, stored, lin, kept

    def absorbable(self, u: Node, lin: set[str], desc: set[str], total: int) -> bool:
        if not _pointwise_group(u):
            return False
        plan = u.attrs["plan"]
        if _numel(plan["domain"]) != total:
            return False
        for i, v in enumerate(u.args):
            if not isinstance(v, Value):
                return False
            if v.name in lin:
                leaf = u.body.inputs[i]
                readers = [n for n in u.body.nodes if any(a.name == leaf.name for a in n.inputs())]
                if not all(_walks_in_order(leaf, n, plan["maps"], plan["domain"]) for n in readers):
                    return False
            elif v.name in desc:            # computed from the products outside this node: a cycle
                return False
        return True

    def prologue(self, a: Value, consumers: set[int], taken: set[int]) -> list[Node]:
        """A pointwise group whose only output is A (or is reshaped to A) and that only these
        matmuls read: computed per A tile instead of stored. Returns [group, reshapes...] or []."""
        v, views = a, []
        while v.name not in self.leaves:
            p = self.prod.get(v.name)
            if p is None:
                return []
            if p.op in ORDER_VIEWS and isinstance(p.args[0], Value):
                views.append(p)
                v = p.args[0]
                continue
            if id(p) in taken or not _pointwise_group(p) or len(p.outputs) != 1 or \
                    len(p.body.nodes) > PROLOGUE_MAX_OPS:
                return []
            if _numel(p.attrs["plan"]["domain"]) != a.type.numel or not _in_order_output(v, p.attrs["plan"]):
                return []
            chain = {v.name} | {w.out.name for w in views}
            for name in chain:
                if name in self.outs:
                    return []
                for u in self.users.get(name, []):
                    if id(u) not in consumers and not (u.op in ORDER_VIEWS and u.out.name in chain):
                        return []
            return [p, *views]
        return []


def _reach(an: _Analysis, m: Node) -> set[int]:
    """The pointwise groups product ``m`` reaches through order-keeping views and pointwise
    groups (up to 8): where an epilogue could come from."""
    seen, frontier, groups = set(), [m.out.name], set()
    while frontier and len(groups) < 8:
        for u in an.users.get(frontier.pop(), []):
            if (u.op in ORDER_VIEWS or _pointwise_group(u)) and id(u) not in seen:
                seen.add(id(u))
                frontier.extend(o.name for o in u.outputs)
                if _pointwise_group(u):
                    groups.add(id(u))
    return groups


def _segments(an: _Analysis, group: list[Node], reach: dict[int, set[int]]) -> list[list[Node]]:
    """Split matmuls sharing A into segments: those whose products meet in a pointwise group
    (directly, or through a chain of pointwise groups: fusion may split silu(gate) * up when
    the merged group would hold the gate product in memory) share a segment if their B shapes
    are equal; the others are one segment each."""
    segs: list[list[Node]] = []
    for m in group:
        home = next((s for s in segs if reach[id(m)] & reach[id(s[0])]
                     and tuple(m.args[1].type.shape) == tuple(s[0].args[1].type.shape)), None)
        if home is None:
            segs.append([m])
        else:
            home.append(m)
    return segs


def _plain_units(group: list[Node]) -> list[list[list[Node]]]:
    """Plain products (no epilogue) sharing A at cuBLAS's sizes, each its own launch, except
    that two of one weight shape share one (GQA's k and v: 8192x2048 -> 256 each leave most of an
    H200 idle on cuBLAS, 0.0288 ms for both, where one launch over the pair took 0.0253,
    bench/probe_kv_pair.py). A single plain product stays an ATen call (matmul_fusion)."""
    units: list[list[list[Node]]] = []
    waiting: dict[tuple, list[Node]] = {}
    for m in group:
        key = tuple(m.args[1].type.shape)
        mate = waiting.pop(key, None)
        if mate is not None:
            mate.append(m)
        else:
            waiting[key] = [m]
            units.append([waiting[key]])
    return units


def _cublas_sized(group: list[Node]) -> bool:
    M, K = group[0].args[0].type.shape[-2:]
    n = sum(m.out.type.shape[-1] for m in group)
    return all(m.op == "aten.mm.default" for m in group) and M >= CUBLAS_MIN_M and 2 * M * K * n >= CUBLAS_MIN_FLOPS


def matmul_fusion(g: Graph, options=None) -> Graph:
    """Create kiln.matmul nodes (target triton only; the CPU keeps ATen's matmuls)."""
    if options is None or options.resolved_target() != "triton" or not getattr(options, "fusion", True):
        return g
    an = _Analysis(g)
    mms = [n for n in g.nodes if _eligible(n)]
    by_a: dict[str, list[Node]] = {}
    for m in mms:
        horizontal = m.op == "aten.mm.default" and an.weight_like(m.args[1])
        by_a.setdefault(m.args[0].name if horizontal else f"#{id(m)}", []).append(m)
    autotune = bool(getattr(options, "autotune", False))
    taken: set[int] = set()
    units: list[tuple[list[Node], Node, set[int]]] = []
    for group in by_a.values():
        attempts = [[[m]] for m in group]
        if len(group) > 1:
            reach = {id(m): _reach(an, m) for m in group}
            if _cublas_sized(group) and not any(reach.values()):
                attempts = _plain_units(group) + attempts
            else:
                attempts = [_segments(an, group, reach)] + attempts
        for attempt in attempts:
            if any(id(m) in taken for seg in attempt for m in seg):
                continue
            built = _build(an, attempt, taken, g, autotune)
            if built is None:
                continue
            trial = _order(g, units + [built])
            if trial is None:
                continue
            units.append(built)
            absorbed = built[0]
            taken.update(id(n) for n in absorbed)
    if not units:
        return g
    return g.copy(_order(g, units))


def _build(an: _Analysis, segments: list[list[Node]], taken: set[int], g: Graph, autotune: bool):
    mms = [m for seg in segments for m in seg]
    desc = an.descendants({m.out.name for m in mms})
    a = mms[0].args[0]
    bt = mms[0].out.type.shape[0] if mms[0].op == "aten.bmm.default" else 1
    M, K = a.type.shape[-2], a.type.shape[-1]
    args: list[Value] = []

    def arg(v: Value) -> int:
        for i, w in enumerate(args):
            if w.name == v.name:
                return i
        args.append(v)
        return len(args) - 1

    pro = an.prologue(a, {id(m) for m in mms}, taken)
    absorbed: list[Node] = list(pro)
    plan_pro = None
    if pro:
        plan_pro = {"group": pro[0].outputs[0].name}
        for v in pro[0].args:
            arg(v)
        a_idx = None
    else:
        a_idx = arg(a)
    segs, outputs = [], []
    kept: set[int] = set()
    any_epilogue = False
    inside: set[int] = set()
    for seg in segments:
        absorbed_s, stored, lin, kept_s = an.epilogue(seg, desc, taken | inside)
        kept |= kept_s
        inside.update(id(n) for n in absorbed_s)
        any_epilogue |= any(n.op == "kiln.fused" for n in absorbed_s)
        b_idx = [arg(m.args[1]) for m in seg]
        for n in absorbed_s:
            if n.op == "kiln.fused":
                for v in n.args:
                    if v.name not in lin:
                        arg(v)
        made = {v.name: v for n in (*seg, *absorbed_s) for v in n.outputs}
        out_idx = []
        for name in stored:
            outputs.append(made[name])
            out_idx.append(len(outputs) - 1)
        segs.append({"n": seg[0].out.type.shape[-1], "b": b_idx, "acc": [m.out.name for m in seg],
                     "groups": [n.outputs[0].name for n in absorbed_s if n.op == "kiln.fused"],
                     "lin": sorted(lin), "stores": stored, "outputs": out_idx})
        absorbed += [*seg, *absorbed_s]
    single = len(segments) == 1 and len(segments[0]) == 1
    if single and not any_epilogue and not pro and M > GEMV_MAX_M and not autotune:
        return None                     # a plain large matmul: cuBLAS as before
    absorbed.sort(key=lambda n: an.pos[id(n)])
    body = Graph(inputs=list(args), nodes=list(absorbed), outputs=list(outputs))
    ops = [n.op.split(".")[1] for n in absorbed if n.op in MATMULS]
    plan = {"kind": "matmul", "batch": bt, "M": M, "K": K, "a": a_idx, "prologue": plan_pro,
            "segments": segs, "gemv": M <= GEMV_MAX_M}
    name = f"k{an.pos[id(mms[0])]}_matmul_" + "_".join(ops)[:24] + ("_epi" if any_epilogue else "")
    node = Node("kiln.matmul", tuple(args), {}, list(outputs),
                {"body": body, "kind": "matmul", "plan": plan, "name": name})
    return absorbed, node, kept


def _order(g: Graph, units: list[tuple[list[Node], Node, set[int]]]) -> list[Node] | None:
    """The node list with each unit's absorbed nodes replaced by its kiln.matmul node (reshapes
    whose output is still used outside stay as well), topologically sorted; None on a cycle."""
    pos = {id(n): i for i, n in enumerate(g.nodes)}
    replaced: dict[int, int] = {}
    keep_views: set[int] = set()
    for u, (absorbed, _, kept) in enumerate(units):
        keep_views |= kept
        for n in absorbed:
            replaced[id(n)] = u
    items: dict = {}
    for n in g.nodes:
        if id(n) in replaced and id(n) not in keep_views:
            u = replaced[id(n)]
            items.setdefault(("u", u), (pos[id(n)], units[u][1]))
        else:
            items[("n", id(n))] = (pos[id(n)], n)
    prod = {v.name: key for key, (_, n) in items.items() for v in n.outputs}
    dag = nx.DiGraph()
    dag.add_nodes_from(items)
    for key, (_, n) in items.items():
        for v in n.inputs():
            p = prod.get(v.name)
            if p is not None:
                if p == key:
                    return None
                dag.add_edge(p, key)
    if not nx.is_directed_acyclic_graph(dag):
        return None
    order = nx.lexicographical_topological_sort(dag, key=lambda k: items[k][0])
    return [items[k][1] for k in order]

"""Execution order that lowers peak live bytes. The captured order is topological but often
runs every branch's producer before any consumer (all matmuls of a layer, then their
epilogues), keeping several large tensors alive at once. A list scheduler instead picks, among
the nodes whose inputs are ready, the one that frees the most bytes net of what it allocates
(ties: the earlier node), which finishes a branch before starting the next.

The cost of an order is what the device holds at its peak: the arena (at least the peak of
planned buffers live at once, held for the whole graph) plus the peak of the other storage
(ATen outputs, escaping values) that PyTorch's allocator holds. Candidates (the captured order,
and list schedules weighing all bytes or only planned ones) are compared by that cost and the
captured order is kept unless one is strictly lower. Steps run one after another on one
stream, so the estimated time (the sum of step times) does not depend on the order.

Order constraints beyond data edges: mutating and unknown ops are barriers (nothing moves across
them), and random ops keep their relative order (they draw from one generator)."""
from __future__ import annotations

from kiln.ir import Graph, Node, resolve
from kiln.ir.ops import is_kernel_op
from .memory import fresh_outputs, plannable


def _is_barrier(n: Node) -> bool:
    if is_kernel_op(n.op):
        return False
    if "callable" in n.attrs:
        return True
    try:
        return resolve(n.op)._schema.is_mutable
    except KeyError:
        return True


def _is_random(n: Node) -> bool:
    import torch
    ops = [m.op for m in n.body.all_nodes()] if n.body is not None else [n.op]
    for op in ops:
        try:
            if torch.Tag.nondeterministic_seeded in resolve(op).tags:
                return True
        except KeyError:
            continue
    return False


class _Storage:
    """Fresh storages (root value -> bytes) and, per node, the roots it allocates and reads."""
    def __init__(self, g: Graph, nodes: list[Node]):
        roots: dict[str, set[str]] = {}
        self.nbytes: dict[str, int] = {}
        self.allocs: dict[int, list[str]] = {}
        self.reads: dict[int, set[str]] = {}
        self.planned: set[str] = set()       # roots that will live in the arena
        for n in nodes:
            reads = set().union(*(roots.get(v.name, set()) for v in n.inputs())) if n.inputs() else set()
            self.reads[id(n)] = reads
            if (fresh_outputs(n.op) and "callable" not in n.attrs) or plannable(n):
                self.allocs[id(n)] = []
                for v in n.outputs:
                    roots[v.name] = {v.name}
                    self.nbytes[v.name] = v.type.storage_bytes if v.type is not None else 0
                    self.allocs[id(n)].append(v.name)
                    if plannable(n):
                        self.planned.add(v.name)
            else:
                for v in n.outputs:
                    roots[v.name] = set(reads)
        self.escaping = set().union(*(roots.get(v.name, set()) for v in g.output_values())) if g.outputs else set()
        self.planned -= self.escaping


def peak_bytes(g: Graph, nodes: list[Node] | None = None) -> int:
    """Peak bytes of storage produced by the graph's steps and live at once, in this order."""
    return _peaks(g, nodes, split=False)[0]


def device_cost(g: Graph, nodes: list[Node] | None = None) -> int:
    """Peak of planned buffers live at once (the arena's lower bound, held throughout) plus the
    peak of the other storage: what the device holds at worst in this order."""
    return sum(_peaks(g, nodes, split=True))


def _peaks(g: Graph, nodes, split: bool) -> tuple[int, int]:
    """(peak, 0), or with ``split`` (peak of planned roots, peak of the others)."""
    nodes = g.nodes if nodes is None else nodes
    st = _Storage(g, nodes)
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for r in st.reads[id(n)]:
            last[r] = i
    cur, peak = [0, 0], [0, 0]
    side = (lambda r: int(r not in st.planned)) if split else (lambda r: 0)  # noqa: E731
    dies: dict[int, list[str]] = {}
    for r, i in last.items():
        if r not in st.escaping:
            dies.setdefault(i, []).append(r)
    for i, n in enumerate(nodes):
        for r in st.allocs.get(id(n), ()):
            cur[side(r)] += st.nbytes[r]
        peak = [max(p, c) for p, c in zip(peak, cur)]
        for r in dies.get(i, ()):
            cur[side(r)] -= st.nbytes[r]
        for r in st.allocs.get(id(n), ()):
            if r not in last and r not in st.escaping:
                cur[side(r)] -= st.nbytes[r]          # never read: dead right after its step
    return peak[0], peak[1]


def _list_schedule(seg: list[Node], st: _Storage, pending: dict[str, int], w_other: int,
                   lazy_sources: bool = False) -> list[Node]:
    """Greedy memory-aware order of one barrier-free segment; bytes outside the arena weigh
    ``w_other`` (0 or 1) against planned bytes. ``lazy_sources``: a node that reads nothing
    (a zero-filled buffer) becomes ready only once a reader of it waits on nothing else; the
    greedy choice would otherwise run it first whenever it allocates least, and hold it (a
    backward's embedding-gradient buffer) for the whole graph."""
    pos = {id(n): i for i, n in enumerate(seg)}
    prod = {v.name: n for n in seg for v in n.outputs}
    preds: dict[int, set[int]] = {i: set() for i in range(len(seg))}
    for i, n in enumerate(seg):
        for v in n.inputs():
            p = prod.get(v.name)
            if p is not None:
                preds[i].add(pos[id(p)])
    rand = [i for i, n in enumerate(seg) if _is_random(n)]
    for a, b in zip(rand, rand[1:]):
        preds[b].add(a)
    succs: dict[int, list[int]] = {i: [] for i in range(len(seg))}
    for i, ps in preds.items():
        for p in ps:
            succs[p].append(i)
    waiting = {i: len(ps) for i, ps in preds.items()}
    lazy = {i for i, n in enumerate(seg) if lazy_sources and not n.inputs() and st.allocs.get(id(n)) and succs[i]}
    # a reader's wait on other nodes than lazy sources; at 0 its lazy sources are released
    others = {i: len(ps - lazy) for i, ps in preds.items()}
    ready = {i for i, k in waiting.items() if k == 0 and i not in lazy}
    for j in range(len(seg)):
        if others[j] == 0 and preds[j] & lazy:
            ready |= preds[j] & lazy
    order: list[Node] = []

    w = lambda r: st.nbytes[r] if r in st.planned else w_other * st.nbytes[r]  # noqa: E731

    def score(i: int) -> int:
        n = seg[i]
        freed = sum(w(r) for r in st.reads[id(n)] if pending.get(r) == 1 and r not in st.escaping)
        return freed - sum(w(r) for r in st.allocs.get(id(n), ()))

    done: set[int] = set()
    while ready or len(done) < len(seg):
        if not ready:           # lazy sources whose readers wait on something never released
            ready = {i for i in lazy if i not in done}
        i = max(ready, key=lambda j: (score(j), -j))
        ready.remove(i)
        done.add(i)
        n = seg[i]
        order.append(n)
        for r in st.reads[id(n)]:
            pending[r] -= 1
        for j in succs[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.add(j)
            if i not in lazy:
                others[j] -= 1
                if others[j] == 0:
                    ready |= {k for k in preds[j] & lazy if k not in done}
    return order


def memory_order(g: Graph, w_other: int = 1, lazy_sources: bool = False) -> list[Node]:
    st = _Storage(g, g.nodes)
    pending: dict[str, int] = {}
    for n in g.nodes:
        for r in st.reads[id(n)]:
            pending[r] = pending.get(r, 0) + 1
    order: list[Node] = []
    seg: list[Node] = []
    for n in g.nodes + [None]:
        if n is None or _is_barrier(n):
            order += _list_schedule(seg, st, pending, w_other, lazy_sources)
            seg = []
            if n is not None:
                order.append(n)
                for r in st.reads[id(n)]:
                    pending[r] -= 1
        else:
            seg.append(n)
    return order


def sink_leaf_views(g: Graph, nodes: list[Node]) -> list[Node]:
    """``nodes`` with every view of a graph input or constant (or a chain of such views) moved
    down to just before its first reader, never across a barrier. A view allocates nothing, so
    the device cost does not change; but a weight the tier planner streams (map_tiers) must be
    on the device from the step that views it, and AOTAutograd's backward takes the transposes
    of all saved weights at its top."""
    from kiln.ir import OpKind, op_kind
    leaves = {v.name for v in g.leaves()}
    order = list(nodes)
    movable = set()
    for n in order:
        ins = n.inputs()
        if not is_kernel_op(n.op) and op_kind(n.op) == OpKind.VIEW and ins and not _is_barrier(n) \
                and all(v.name in leaves for v in ins):
            movable.add(id(n))
            leaves |= {v.name for v in n.outputs}      # views of it are views of a leaf too
    for i in range(len(order) - 1, -1, -1):            # last first: a chain's later views sink first
        n = order[i]
        if id(n) not in movable:
            continue
        outs = {v.name for v in n.outputs}
        j = i + 1
        while j < len(order) and not _is_barrier(order[j]) and not any(v.name in outs for v in order[j].inputs()):
            j += 1
        if j > i + 1:
            order.insert(j - 1, order.pop(i))
    return order


def schedule(g: Graph, options=None) -> Graph:
    """Reorder for a lower device peak; keep the captured order unless a candidate is lower.
    Views of inputs and constants then move down to their first reader (sink_leaf_views).
    meta["schedule"] records the device cost and the peak of all storage before and after."""
    before = device_cost(g)
    best, best_cost = None, before
    for w_other, lazy in ((1, False), (0, False), (1, True), (0, True)):
        order = memory_order(g, w_other, lazy)
        cost = device_cost(g, order)
        if cost < best_cost:
            best, best_cost = order, cost
    sunk = sink_leaf_views(g, best if best is not None else g.nodes)
    if any(a is not b for a, b in zip(sunk, best if best is not None else g.nodes)):
        best = sunk
    g2 = g.copy(best)
    g2.meta["schedule"] = {"cost_before": before, "cost_after": best_cost, "reordered": best is not None,
                           "peak_before": peak_bytes(g), "peak_after": peak_bytes(g2)}
    return g2

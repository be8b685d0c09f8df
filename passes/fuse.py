"""Fusion: vertical (producer into consumer: pointwise chains, pointwise into a reduction's
prologue and epilogue) and horizontal (independent groups over one iteration space that read a
common input). Legal when the merged group has a loop plan (passes.loops.analyze) and no path
leaves the group and comes back (no cycle through it). Each group becomes one ``kiln.fused``
node whose body is the group's subgraph and whose attrs hold the loop plan."""
from __future__ import annotations

import networkx as nx
import torch

from kiln.ir import Graph, Node, OpKind, Value, op_kind
from kiln.ir.scalar import is_lowerable
from .loops import NotFusible, analyze

MAX_GROUP = 64          # nodes per kernel: beyond this, register pressure outweighs saved traffic
HOLD_BYTES = 1 << 20    # a merge may not keep this many bytes of inputs alive longer (see _holds)


HALF = (torch.float16, torch.bfloat16)
RESHAPES = {"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.unsqueeze.default",
            "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default"}


def _reshaping(plan: dict) -> bool:
    """Did the plan map a value onto the domain by regrouping its dims (a reshaped view, or a
    rank that only lines up by running products)?"""
    return bool(plan.get("regrouped"))


def _fusible(n: Node, target: str | None = None) -> bool:
    k = op_kind(n.op)
    if k not in (OpKind.POINTWISE, OpKind.REDUCTION, OpKind.VIEW) or len(n.outputs) != 1:
        return False
    if n.out.type is None or any(v.type is None for v in n.inputs()):
        return False
    if n.out.type.device not in ("cpu", "cuda"):
        return False
    # numba has no 16-bit floats: on the cpu target they stay with ATen (which rounds each op)
    if target == "cpu" and any(v.type.dtype in HALF for v in [n.out, *n.inputs()]):
        return False
    return k == OpKind.VIEW or is_lowerable(n)


def _target(options) -> str | None:
    resolve = getattr(options, "resolved_target", None)
    return resolve() if resolve is not None else None


class _Groups:
    def __init__(self, g: Graph):
        self.g = g
        self.nodes = g.nodes
        self.pos = {id(n): i for i, n in enumerate(g.nodes)}
        self.prod = g.producers()
        self.users = g.users()
        self.out_names = {v.name for v in g.output_values()}
        self.gid = {i: i for i in range(len(g.nodes))}          # node index -> group id
        self.members = {i: [i] for i in range(len(g.nodes))}   # group id -> node indices
        self.plans: dict[int, dict] = {}
        self._alone: dict[int, dict | None] = {}               # node index -> its plan on its own

    def body(self, idxs: list[int]) -> Graph:
        idxs = sorted(idxs)
        inside = {v.name for i in idxs for v in self.nodes[i].outputs}
        ins, seen = [], set()
        for i in idxs:
            for v in self.nodes[i].inputs():
                if v.name not in inside and v.name not in seen:
                    seen.add(v.name)
                    ins.append(v)
        outs = []
        for i in idxs:
            for v in self.nodes[i].outputs:
                ext = [u for u in self.users.get(v.name, []) if self.pos[id(u)] not in idxs]
                if ext or v.name in self.out_names:
                    outs.append(v)
        return Graph(inputs=ins, nodes=[self.nodes[i] for i in idxs], outputs=outs)

    def plan(self, idxs) -> dict | None:
        if len(idxs) > MAX_GROUP:
            return None
        b = self.body(idxs)
        if not b.outputs or all(op_kind(n.op) == OpKind.VIEW for n in b.nodes):
            return None
        try:
            return analyze(b)
        except NotFusible:
            return None

    def plan_of(self, gid: int) -> dict | None:
        """The loop plan of a group; single-node groups get theirs on first use (vertical
        merges record plans only for the groups they build)."""
        if gid not in self.plans:
            p = self.plan(self.members[gid])
            if p is None:
                return None
            self.plans[gid] = p
        return self.plans[gid]

    def _reaches(self, src: set[int], dst: set[int]) -> bool:
        """Is there a path from group ``src`` to group ``dst`` through a node in neither? Paths
        run through groups, not only nodes: a fused group runs once all its inputs exist, so
        reaching any member reaches all of its outputs (two horizontally merged nodes with no path
        between them still order everything around them)."""
        outside = lambda k: k not in src and k not in dst  # noqa: E731
        stack = [k for i in src for v in self.nodes[i].outputs for u in self.users.get(v.name, [])
                 if outside(k := self.pos[id(u)])]
        seen: set[int] = set()
        while stack:
            gj = self.gid[stack.pop()]
            if gj in seen:
                continue
            seen.add(gj)
            for j in self.members[gj]:
                for v in self.nodes[j].outputs:
                    for u in self.users.get(v.name, []):
                        k = self.pos[id(u)]
                        if k in dst:
                            return True
                        if outside(k) and self.gid[k] not in seen:
                            stack.append(k)
        return False

    def _ready(self, group: set[int], merged: set[int]) -> int:
        """Position of the last producer, outside ``merged``, of an input of ``group``."""
        return max((self.pos[id(p)] for i in group for v in self.nodes[i].inputs()
                    if (p := self.prod.get(v.name)) is not None and self.pos[id(p)] not in merged), default=-1)

    def _holds(self, ma: set[int], mb: set[int]) -> bool:
        """Would the merged kernel keep big tensors alive longer? It runs once the inputs of
        both groups exist, so the group that was ready earlier now holds every input it was the
        last reader of until then (e.g. per-layer bias-gradient sums merged across layers keep
        every layer's gradient alive). For tensors this big the launch a merge saves is worth
        less than the memory, unless the nodes that run meanwhile make little (then nothing big
        is alive next to the held inputs); pointwise chains and a reduction's prologue are never
        delayed. Inputs count through their views, not if the late group reads them too, and net
        of what the early group stored only for the late one (no longer stored once merged)."""
        m = ma | mb
        ra, rb = self._ready(ma, m), self._ready(mb, m)
        if ra == rb:
            return False
        early, late, at = (ma, mb, rb) if ra < rb else (mb, ma, ra)
        made = {v.name for i in late for v in self.nodes[i].outputs}
        if any(v.name in made for i in early for v in self.nodes[i].inputs()):
            return False            # the early group reads the late one's output: it waited anyway
        # capture's addmm scales its bias (a [n] vector) after the product: holding the product
        # over those few small nodes costs no memory, and refusing cut the product's epilogue
        if sum(v.type.storage_bytes for k in range(min(ra, rb) + 1, at + 1) if k not in m
               for v in self.nodes[k].outputs if v.type is not None) < HOLD_BYTES:
            return False
        held: dict[str, int] = {}
        for i in early:
            for v in self.nodes[i].inputs():
                v = self._base(v)                   # a view holds the tensor it views
                p = self.prod.get(v.name)
                if p is None or self.pos[id(p)] in m or v.type is None:
                    continue                        # graph inputs and weights stay alive anyway
                # read later outside the merge, or by the late group (which runs at ``at``
                # merged or not: rotary's halves of one projection), it is alive then anyway
                later = [k for k in self._readers(v) if k not in early]
                if v.name not in self.out_names and (not later or max(later) < at):
                    held[v.name] = v.type.storage_bytes
        # what the early group made only for the late one is never stored once they merge: it
        # was alive over the same wait (SwiGLU: the gate product held instead of silu's output)
        freed = 0
        for i in early:
            if op_kind(self.nodes[i].op) == OpKind.VIEW:
                continue
            for v in self.nodes[i].outputs:
                readers = {self.pos[id(u)] for u in self.users.get(v.name, [])} - early
                if v.type is not None and v.name not in self.out_names and readers and readers <= late:
                    freed += v.type.storage_bytes
        return sum(held.values()) - freed >= HOLD_BYTES

    def _base(self, v: Value) -> Value:
        """The value ``v`` views (through a chain of view ops), or ``v`` itself."""
        p = self.prod.get(v.name)
        while p is not None and op_kind(p.op) == OpKind.VIEW and p.args and isinstance(p.args[0], Value) \
                and len(p.outputs) == 1:
            v = p.args[0]
            p = self.prod.get(v.name)
        return v

    def _readers(self, v: Value) -> list[int]:
        """Positions of the nodes that read ``v``, directly or through views of it."""
        found, stack, seen = [], [v.name], set()
        while stack:
            name = stack.pop()
            for u in self.users.get(name, []):
                k = self.pos[id(u)]
                if k in seen:
                    continue
                seen.add(k)
                found.append(k)
                if op_kind(u.op) == OpKind.VIEW:
                    stack.extend(o.name for o in u.outputs)
        return found

    def _epilogue_like(self, gid: int) -> bool:
        """Does the group read a matmul's product as it is stored (through reshaping views at
        most)? The matmul pass then runs it as the matmul's epilogue, which a merge across a
        reshape would take away (its plan no longer walks the product in order)."""
        for i in self.members[gid]:
            for v in self.nodes[i].inputs():
                p = self.prod.get(v.name)
                while p is not None and p.op in RESHAPES and not self._inside(p, gid):
                    p = self.prod.get(p.args[0].name)
                if p is not None and op_kind(p.op) == OpKind.MATMUL and not self._inside(p, gid):
                    return True
        return False

    def _out_bytes(self, members: set[int]) -> int:
        """Bytes the members would store: values read outside them or returned by the graph."""
        return sum(v.type.storage_bytes for i in members for v in self.nodes[i].outputs
                   if v.type is not None and (v.name in self.out_names or any(
                       self.pos[id(u)] not in members for u in self.users.get(v.name, []))))

    def _feeds_epilogue(self, members: set[int]) -> bool:
        """Does a group outside ``members`` that reads their outputs read a matmul's product?"""
        return any(self._epilogue_like(self.gid[k]) for i in members for v in self.nodes[i].outputs
                   for u in self.users.get(v.name, []) if (k := self.pos[id(u)]) not in members)

    def side_branch(self, k: int, i: int) -> bool:
        """Would pointwise node ``i`` joining the group of its producer ``k`` make it a side
        output of another reduction's kernel? So when ``k`` is in a reduction's group without
        depending on a reduction there (the reduction's prologue, not its epilogue), and a
        reduction that ``i`` feeds (through pointwise ops) reduces differently: that one would
        read what this kernel stores instead of taking ``i`` into its own prologue."""
        gid = self.gid[k]
        members = self.members[gid]
        if len(members) == 1 or not any(op_kind(self.nodes[j].op) == OpKind.REDUCTION for j in members):
            return False
        stack, seen = [k], set()
        while stack:
            j = stack.pop()
            if op_kind(self.nodes[j].op) == OpKind.REDUCTION:
                return False
            for v in self.nodes[j].inputs():
                p = self.prod.get(v.name)
                if p is not None and (q := self.pos[id(p)]) not in seen and self.gid[q] == gid:
                    seen.add(q)
                    stack.append(q)
        mine = self.plan_of(gid)
        if mine is None:
            return False
        stack, seen = [i], {i}
        while stack:
            j = stack.pop()
            for v in self.nodes[j].outputs:
                for u in self.users.get(v.name, []):
                    q = self.pos[id(u)]
                    if q in seen or self.gid[q] == gid:
                        continue
                    seen.add(q)
                    kind = op_kind(u.op)
                    if kind == OpKind.REDUCTION:
                        if q not in self._alone:
                            self._alone[q] = self.plan([q])
                        theirs = self._alone[q]
                        if theirs is not None and (theirs["domain"], theirs["reduce_dims"]) != \
                                (mine["domain"], mine["reduce_dims"]):
                            return True
                    elif kind in (OpKind.POINTWISE, OpKind.VIEW):
                        stack.append(q)
        return False

    def _inside(self, n: Node, gid: int) -> bool:
        return self.gid[self.pos[id(n)]] == gid

    def try_merge(self, a: int, b: int) -> bool:
        ga, gb = self.gid[a], self.gid[b]
        if ga == gb:
            return False
        ma, mb = set(self.members[ga]), set(self.members[gb])
        first, second = (ma, mb) if min(ma) < min(mb) else (mb, ma)
        if self._reaches(first, second) or self._reaches(second, first) or self._holds(ma, mb):
            return False
        plan = self.plan(sorted(ma | mb))
        if plan is None:
            return False
        if _reshaping(plan) and (self._epilogue_like(ga) or self._epilogue_like(gb)):
            return False
        # Across a reshape, a group that feeds a matmul's epilogue (which it cannot join, above)
        # may only grow if it then stores no more than either side did: in program order it
        # would otherwise take, one by one, ops that belong to that epilogue (the GELU backward's
        # three terms became three stored tensors read by the epilogue instead of one input).
        if _reshaping(plan) and self._feeds_epilogue(ma | mb) \
                and self._out_bytes(ma | mb) > max(self._out_bytes(ma), self._out_bytes(mb)):
            return False
        keep, drop = (ga, gb) if ga < gb else (gb, ga)
        self.members[keep] = sorted(ma | mb)
        for i in self.members.pop(drop):
            self.gid[i] = keep
        self.plans[keep] = plan
        self.plans.pop(drop, None)
        return True


def fuse(g: Graph, options=None) -> Graph:
    G = _Groups(g)
    target = _target(options)
    fusible = [_fusible(n, target) for n in g.nodes]
    # vertical: pull each fusible producer into its consumer's group, in program order. First
    # pass: a pointwise node does not join a reduction's group through a value the reduction
    # does not feed (its prologue) when it feeds a reduction of another shape (see side_branch),
    # so that one can take it first (a layer norm backward's column sums took the row sums'
    # prologue and stored four tensors for them); the second pass makes the merges left.
    for side_branches in (False, True):
        for i, n in enumerate(g.nodes):
            if not fusible[i]:
                continue
            for v in n.inputs():
                p = G.prod.get(v.name)
                if p is None or not fusible[G.pos[id(p)]]:
                    continue
                if not side_branches and op_kind(n.op) == OpKind.POINTWISE and G.side_branch(G.pos[id(p)], i):
                    continue
                G.try_merge(G.pos[id(p)], i)
    # horizontal: groups that read a common input and share an iteration space
    readers: dict[str, list[int]] = {}
    for i, n in enumerate(g.nodes):
        if fusible[i]:
            for v in n.inputs():
                readers.setdefault(v.name, []).append(i)
    for name, idxs in readers.items():
        for a, b in zip(idxs, idxs[1:]):
            pa, pb = G.plan_of(G.gid[a]), G.plan_of(G.gid[b])
            if pa and pb and (pa["domain"], pa["reduce_dims"]) == (pb["domain"], pb["reduce_dims"]):
                G.try_merge(a, b)
    _drop_tail_views(G)
    return _rebuild(g, G, fusible)


def _drop_tail_views(G: _Groups) -> None:
    """Views no member of their group reads leave the group: inside it the kernel would store
    the view as a copy of its source (a transposed gradient next to the gradient: a second
    buffer as big as the first); outside it the view is free, over the stored source."""
    for gid, idxs in list(G.members.items()):
        if len(idxs) < 2:
            continue
        members = set(idxs)
        for i in sorted(idxs, reverse=True):        # consumers first: a chain of views drops whole
            n = G.nodes[i]
            if op_kind(n.op) != OpKind.VIEW:
                continue
            if not any(G.pos[id(u)] in members for v in n.outputs for u in G.users.get(v.name, [])):
                members.discard(i)
        if members == set(idxs) or all(op_kind(G.nodes[i].op) == OpKind.VIEW for i in members):
            continue
        plan = G.plan(sorted(members))
        if plan is None:
            continue
        del G.members[gid]
        G.plans.pop(gid, None)
        key = min(members)
        G.members[key], G.plans[key] = sorted(members), plan
        for i in members:
            G.gid[i] = key
        for i in set(idxs) - members:
            G.members[i], G.gid[i] = [i], i


def _rebuild(g: Graph, G: _Groups, fusible) -> Graph:
    units: dict[int, Node] = {}
    for gid, idxs in G.members.items():
        if len(idxs) == 1 and (not fusible[idxs[0]] or op_kind(g.nodes[idxs[0]].op) == OpKind.VIEW):
            units[gid] = g.nodes[idxs[0]]
            continue
        plan = G.plans.get(gid) or G.plan(idxs)
        if plan is None:            # a lone node with no plan (e.g. output is an input): keep it
            for i in idxs:
                units[i] = g.nodes[i]
            continue
        body = G.body(idxs)
        names = [n.op.split(".")[1] for n in body.nodes if op_kind(n.op) != OpKind.VIEW]
        attrs = {"body": body, "kind": plan["kind"], "plan": plan,
                 "name": f"k{len(units)}_{plan['kind']}_" + "_".join(dict.fromkeys(names))[:48]}
        units[gid] = Node("kiln.fused", tuple(body.inputs), {}, list(body.outputs), attrs)
    # order the units topologically, earliest original position first
    prod = {v.name: gid for gid, u in units.items() for v in u.outputs}
    dag = nx.DiGraph()
    dag.add_nodes_from(units)
    for gid, u in units.items():
        for v in u.inputs():
            if v.name in prod and prod[v.name] != gid:
                dag.add_edge(prod[v.name], gid)
    order = list(nx.lexicographical_topological_sort(dag))
    return g.copy([units[k] for k in order])

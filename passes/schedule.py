"""Execution order. The captured order is already topological; this pass re-orders fused nodes
so that each runs as late as its consumers allow only where that lowers live bytes (issue 4
deepens it). For now it is a stable topological sort of the (possibly fused) node list."""
from __future__ import annotations

import networkx as nx

from kiln.ir import Graph


def schedule(g: Graph, options=None) -> Graph:
    prod = g.producers()
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(g.nodes)))
    index = {id(n): i for i, n in enumerate(g.nodes)}
    for i, n in enumerate(g.nodes):
        for v in n.inputs():
            p = prod.get(v.name)
            if p is not None:
                dag.add_edge(index[id(p)], i)
    order = list(nx.lexicographical_topological_sort(dag))
    return g.copy([g.nodes[i] for i in order])

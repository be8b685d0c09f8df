from kiln.ir import Graph

def fuse(g: Graph, options=None) -> Graph:
    return g

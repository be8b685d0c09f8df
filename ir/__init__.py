"""kiln.ir: the graph IR (types, nodes, graphs, op registry, capture, text/JSON forms, verifier)."""
from .graph import Graph, Node, Value, iter_values, map_values
from .ops import OpKind, op_kind, resolve, infer
from .types import TensorType, contiguous_strides, dtype_name, parse_dtype
from .text import print_graph, parse_graph
from .serialize import graph_to_json, graph_from_json
from .verify import VerifyError, verify

__all__ = ["Graph", "Node", "Value", "iter_values", "map_values", "OpKind", "op_kind", "resolve",
           "infer", "TensorType", "contiguous_strides", "dtype_name", "parse_dtype", "print_graph",
           "parse_graph", "graph_to_json", "graph_from_json", "VerifyError", "verify"]

"""The gather pass: ``aten.embedding`` (a row gather from a 2-D weight) becomes a ``kiln.gather``
kernel node, so a model's embeddings run as generated kernels rather than ATen calls. Its
backward (``aten.embedding_dense_backward``, a scatter-add) stays ATen."""
from __future__ import annotations

import torch

from kiln.ir import Graph, Node

OP = "aten.embedding.default"
KERNEL = "kiln.gather"
_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
           torch.int16, torch.int32, torch.int64, torch.bool}


def _gatherable(n: Node) -> bool:
    w, idx = n.args[0], n.args[1]
    out = n.outputs[0].type if len(n.outputs) == 1 else None
    return (out is not None and w.type is not None and idx.type is not None and w.type.rank == 2
            and w.type.dtype in _DTYPES and idx.type.dtype in (torch.int32, torch.int64)
            and out.is_contiguous and w.type.device == idx.type.device)


def gather_rows(g: Graph, options=None) -> Graph:
    """Pipeline pass. padding_idx and scale_grad_by_freq change only the backward."""
    nodes, changed = [], False
    for n in g.nodes:
        if n.op == OP and _gatherable(n):
            nodes.append(Node(KERNEL, (n.args[0], n.args[1]), {}, list(n.outputs),
                              {"name": f"gather_{n.outputs[0].name}", "ops": [OP]}))
            changed = True
        else:
            nodes.append(n)
    return g.copy(nodes) if changed else g

"""Shared graphs for the IR tests: a captured transformer-ish block and a hand-built fused graph."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from kiln.ir import Graph, Node, TensorType, Value, contiguous_strides
from kiln.ir.capture import from_fx
from kiln.ir.decompose import decomposition_table
from kiln.ir.text import opaque_marker


def capture(fn, *inputs, constants=None):
    gm = make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="fake")(*inputs)
    return from_fx(gm, constants)


def block(x, w, b, ln_w, ln_b, idx, mask):
    h = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b)
    q = (h @ w + b).view(2, 4, 2, 8).permute(0, 2, 1, 3)
    att = torch.softmax(q @ q.transpose(-1, -2) / 4.0, dim=-1).masked_fill(mask, float("-inf"))
    o = F.gelu((att @ q).permute(0, 2, 1, 3).reshape(2, 4, 16)).to(torch.bfloat16).float()
    var, mean = torch.var_mean(o, dim=-1, keepdim=True)
    top, arg = torch.max(o, dim=-1)                   # multi-output node that survives decomposition
    lo, hi = torch.split(o, [1, 3], dim=1)            # list output; `hi` has a storage offset
    e = lo.expand(2, 4, 16)                           # stride-0 view
    return o + e, var, mean, top, arg, hi, o.sum() * 0.5, idx + 1, mask.any(), None


def block_inputs():
    torch.manual_seed(0)
    return (torch.randn(2, 4, 16), torch.randn(16, 16), torch.randn(16), torch.randn(16),
            torch.randn(16), torch.tensor(3), torch.rand(2, 2, 4, 4) > 0.9)


def tt(shape, dtype=torch.float32, strides=None, device="cpu", offset=0):
    shape = tuple(shape)
    return TensorType(shape, dtype, tuple(strides) if strides else contiguous_strides(shape), device, offset)


def fused_graph() -> Graph:
    """Hand-built: a constant, a kiln.fused node with a nested body, odd scalars and kwargs."""
    x, w, c0 = Value("x", tt([4, 16])), Value("w", tt([16, 16])), Value("c0", tt([16]))
    a, b = Value("a", tt([4, 16])), Value("b", tt([4, 16]))
    r, s = Value("r", tt([4, 16])), Value("s", tt([4, 16]))
    body = Graph(inputs=[a, b], nodes=[
        Node("aten.mul.Tensor", (a, b), {}, [r]),
        Node("aten.clamp.default", (r, float("-inf"), float("inf")), {}, [s])], outputs=[s])
    add, mm, y = Value("add", tt([4, 16])), Value("mm", tt([4, 16])), Value("y", tt([4, 16]))
    full, n = Value("full", tt([2, 3], torch.bfloat16)), Value("n", None)
    return Graph(
        inputs=[x, w], constant_values=[c0], constants={"c0": torch.randn(16)},
        nodes=[Node("aten.add.Tensor", (x, c0), {"alpha": 2}, [add]),
               Node("aten.mm.default", (add, w), {}, [mm]),
               Node("kiln.fused", (mm, x), {}, [y], {"kind": "pointwise", "tile": (16, 4),
                                                      "fill": math.nan, "body": body}),
               Node("aten.full.default", ([2, 3], math.nan),
                    {"dtype": torch.bfloat16, "layout": torch.strided, "device": torch.device("cpu"),
                     "pin_memory": False}, [full]),
               Node("aten.sym_size.int", (x, 0), {}, [n])],
        outputs=[mm, y, None, full, n])


def _norm(x):
    """Comparable form of graph structure: Values by name+type, floats by repr (nan == nan)."""
    if isinstance(x, Graph):
        return ("G", _norm(x.inputs), _norm(x.constant_values), _norm(x.outputs), _norm(x.meta),
                tuple((n.op, _norm(n.args), _norm(n.kwargs), _norm(n.outputs), _norm(n.attrs)) for n in x.nodes))
    if isinstance(x, Value):
        return ("%", x.name, x.type)
    if isinstance(x, float):
        return ("f", repr(x))
    if callable(x):                   # a Python callable compares equal to the marker it loads as
        return ("callable", opaque_marker(x, "callable").text)
    if isinstance(x, (list, tuple)):
        return ("list" if isinstance(x, list) else "tuple", tuple(_norm(o) for o in x))   # fx's immutable_list
    if isinstance(x, dict):
        return ("d", tuple(sorted((str(k), _norm(v)) for k, v in x.items())))
    return (type(x).__name__, x)


def same_graph(a: Graph, b: Graph, meta: bool = True) -> bool:
    if not meta:
        a, b = a.copy(), b.copy()
        a.meta, b.meta = {}, {}
    return _norm(a) == _norm(b)


@pytest.fixture
def helpers():
    """The module's helpers, for tests (importing conftest by name is fragile)."""
    import types
    return types.SimpleNamespace(capture=capture, tt=tt, same_graph=same_graph, fused_graph=fused_graph,
                                 block=block, block_inputs=block_inputs)


@pytest.fixture(scope="session")
def block_graph_base():
    return capture(block, *block_inputs())


@pytest.fixture
def block_graph(block_graph_base):
    return copy.deepcopy(block_graph_base)


@pytest.fixture
def fused():
    return fused_graph()

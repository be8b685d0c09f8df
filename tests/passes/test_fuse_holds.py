"""The fusion pass's memory guard (_holds) refuses a merge that would keep big inputs alive while
other big tensors are made, not one whose wait spans a few small nodes: capture's addmm scales
its bias (a [n] vector) after the product, and the guard used to cut the product's epilogue
there, leaving a kernel that wrote the whole product once more in float32."""
import torch
import torch.nn.functional as F

from kiln.api import captured_graphs
from kiln.options import Options
from kiln.passes.pipeline import PIPELINE


def _fused(fn, *args):
    torch._dynamo.reset()
    with torch.no_grad():
        [(_, g)] = captured_graphs(lambda be: torch.compile(fn, backend=be)(*args))
    opts = Options(target="triton")
    for name, p in PIPELINE:
        g = p(g, opts)
        if name == "fuse":
            return g
    raise AssertionError("no fuse pass")


def test_bias_chain_stays_with_its_product():
    torch.manual_seed(0)
    bf = torch.bfloat16
    x, w, b = torch.randn(1024, 1024, dtype=bf), torch.randn(1024, 1024, dtype=bf), torch.randn(1024, dtype=bf)
    ln = torch.nn.LayerNorm(1024).to(bf)
    g = _fused(lambda x: ln(F.linear(x, w, b) + x), x)
    mm = [v.name for n in g.nodes if n.op == "aten.mm.default" for v in n.outputs]
    readers = [n for n in g.nodes if n.op == "kiln.fused" and any(a.name in mm for a in n.args)]
    assert len(readers) == 1, [(n.op, n.attrs.get("name")) for n in g.nodes]
    ops = [m.op for m in readers[0].body.nodes]
    # one kernel reads the product: its casts, the bias, the residual and the norm
    assert ops.count("aten.add.Tensor") >= 2 and "aten.mean.dim" in ops, ops

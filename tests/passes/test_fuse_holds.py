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


def test_gelu_backward_terms_stay_in_the_matmul_epilogue(monkeypatch):
    """Across a reshape a group may only grow if it then stores no more than before. The test
    zoo's block recomputes GELU's derivative in its backward from the saved [16, 128] product
    viewed as [2, 8, 128]: in program order the product's group took the derivative's terms one
    by one and stored three tensors for the next matmul's epilogue (which cannot join it)
    instead of the one input the epilogue reads now."""
    from memory_graphs import zoo
    from models.pipeline_spy import pass_outputs
    seen = pass_outputs(monkeypatch, "matmul")
    torch.manual_seed(0)
    block, (x,) = zoo()[1]("block")[:2]          # the test zoo's transformer block, [2, 8, 32]
    x.requires_grad_(True)
    torch._dynamo.reset()
    torch.compile(block, backend="kiln", options={"target": "triton"})(x).sum().backward()
    [g] = [g for g in seen if g.meta.get("graph_kind") == "backward"]
    consumers = {}
    for n in g.nodes:
        for v in n.inputs():
            consumers.setdefault(v.name, []).append(n)

    def readers(v):         # through views
        for u in consumers.get(v.name, []):
            yield from (readers(u.out) if u.op == "aten.view.default" else [u])
    feeding = [n for n in g.nodes if n.op.startswith("kiln.fused")
               and (rs := [u for v in n.outputs for u in readers(v)])
               and all(u.op.startswith("kiln.matmul") for u in rs)]
    assert feeding and all(len(n.outputs) == 1 for n in feeding), [[v.name for v in n.outputs] for n in feeding]

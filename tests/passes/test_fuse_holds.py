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


def test_rotary_is_one_kernel_per_projection_at_full_size():
    """Llama's rotary embedding at sizes past HOLD_BYTES (q is 2 MiB here): ``x * cos +
    rotate_half(x) * sin`` is one kernel for q and one for k. The guard used to split it in four
    (neg / where + mul / mul / add): it counted q as held longer by the merge though the late half
    reads q too, and it delayed the final add though the add reads the late group's output (it
    waited for it anyway). On an H200 those four kernels were 0.070 ms of the layer's 1.26."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.rope = LlamaDecoderLayer(cfg, layer_idx=0), LlamaRotaryEmbedding(cfg)

        def forward(self, h):
            pos = torch.arange(h.shape[1])[None].expand(h.shape[0], -1)
            return self.layer(h, attention_mask=None, position_ids=pos, position_embeddings=self.rope(h, pos))[0]

    g = _fused(Layer().eval(), torch.randn(8, 1024, 64))
    rotary = [n for n in g.nodes if n.op == "kiln.fused" and "aten.neg.default" in [m.op for m in n.body.nodes]]
    assert len(rotary) == 2, [n.attrs.get("name") for n in g.nodes if n.op == "kiln.fused"]
    for n in rotary:
        ops = {m.op for m in n.body.nodes}
        assert {"aten.mul.Tensor", "aten.add.Tensor", "aten.where.self"} <= ops, ops


def test_a_merge_that_would_hold_a_big_input_is_still_refused(monkeypatch):
    """Two row sums over one space reading a common scale (horizontal candidates), the first over
    a product it is the last reader of, the second over a product made after it: merged, the
    first product would stay alive while the second is made, so they stay apart (and merge once
    the guard is off, so the guard is what keeps them apart)."""
    from kiln.passes import fuse

    def fn(x, y, w1, w2, c):
        s1 = (x @ w1 * c).sum(-1)               # x @ w1: 2 MiB, its last reader
        s2 = (y @ w2 * c).sum(-1)               # y @ w2: made after it
        return s1, s2
    args = [torch.randn(1024, 512) for _ in range(2)] + [torch.randn(512, 512) for _ in range(2)] + [torch.randn(512)]

    def sums():
        g = _fused(fn, *args)
        return [n for n in g.nodes if n.op == "kiln.fused" and "aten.sum.dim_IntList" in [m.op for m in n.body.nodes]]
    assert len(sums()) == 2
    monkeypatch.setattr(fuse, "HOLD_BYTES", 1 << 40)
    assert len(sums()) == 1


def test_swiglu_is_one_group_past_the_guard_size():
    """silu(gate) * up with products past HOLD_BYTES (5.8 MB each): merging silu into the multiply
    holds the gate product until the up product exists, but silu's output, which is then never
    stored, was alive over that same wait; one group (two before, so the CPU target ran the
    silu's output out to memory and back)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=176)).eval()
    g = _fused(mlp, torch.randn(8192, 64))
    groups = [[m.op for m in n.body.nodes] for n in g.nodes if n.op == "kiln.fused"]
    assert len(groups) == 1 and groups[0].count("aten.mul.Tensor") == 2, groups

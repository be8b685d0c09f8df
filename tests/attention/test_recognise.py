"""The attention recogniser on many spellings (each compiled ahead of time through torch.export,
target cpu, compared with eager), on look-alikes that must not match (still correct), and its
layout algebra on its own."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kiln.aot import compile_ahead
from kiln.ir.types import TensorType
from kiln.passes.attention_layout import Layout, NotAnalysable
from kiln.passes.attention_match import causal_offset

B, H, S, D = 2, 4, 12, 8


def _qkv(dtype=torch.float32, hkv=H, s=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, s, D, generator=g).to(dtype), torch.randn(B, hkv, s, D, generator=g).to(dtype),
            torch.randn(B, hkv, s, D, generator=g).to(dtype))


def _attention_nodes(fn, *args, rtol=1e-4, atol=1e-5):
    compiled, report = compile_ahead(fn, args, {"target": "cpu"})
    torch.testing.assert_close(compiled(*args)[0], fn(*args), rtol=rtol, atol=atol)
    nodes = [n for n in compiled.graph.nodes if n.op == "kiln.attention"]
    assert len([k for k in report.kernels if k["kind"] == "attention"]) == len(nodes)
    return nodes


def _one(fn, *args, **kw):
    nodes = _attention_nodes(fn, *args, **kw)
    assert len(nodes) == 1, "expected one attention kernel"
    return nodes[0].attrs


def _tril(s=S):
    return torch.tril(torch.ones(s, s, dtype=torch.bool))


# ---- spellings that must match -------------------------------------------------------------------
SPELLINGS = {
    "div_sqrt": lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), -1) @ v,
    "mul_scale": lambda q, k, v: ((q @ k.transpose(-1, -2)) * 0.3).softmax(dim=-1) @ v,
    "scaled_q": lambda q, k, v: torch.softmax((q * 0.3) @ k.transpose(-2, -1), -1) @ v,
    "scale_split": lambda q, k, v: torch.softmax((q * D ** -0.25) @ (k * D ** -0.25).transpose(-2, -1), -1) @ v,
    "einsum": lambda q, k, v: torch.einsum("bhqk,bhkd->bhqd", torch.einsum("bhqd,bhkd->bhqk", q, k).mul(0.3)
                                           .softmax(-1), v),
    "masked_fill_tril": lambda q, k, v: torch.softmax(
        (q @ k.transpose(-2, -1) * 0.3).masked_fill(~_tril(), float("-inf")), -1) @ v,
    "masked_fill_eq0": lambda q, k, v: torch.softmax(
        (q @ k.transpose(-2, -1) * 0.3).masked_fill(torch.tril(torch.ones(S, S)) == 0, -1e9), -1) @ v,
    "additive_triu": lambda q, k, v: torch.softmax(
        q @ k.transpose(-2, -1) * 0.3 + torch.triu(torch.full((S, S), float("-inf")), 1), -1) @ v,
    "where_arange": lambda q, k, v: torch.softmax(torch.where(
        torch.arange(S)[None, :] <= torch.arange(S)[:, None], q @ k.transpose(-2, -1) * 0.3,
        torch.tensor(float("-inf"))), -1) @ v,
    "mask_then_scale": lambda q, k, v: torch.softmax(
        (q @ k.transpose(-2, -1)).masked_fill(~_tril(), float("-inf")) / math.sqrt(D), -1) @ v,
    "bart_3d": lambda q, k, v: torch.bmm(torch.softmax(torch.bmm(
        (q * 0.3).reshape(B * H, S, D), k.reshape(B * H, S, D).transpose(1, 2)), -1), v.reshape(B * H, S, D)),
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    "sdpa_causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "sdpa_bool_tril": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=_tril()),
}
CAUSAL = {"masked_fill_tril", "masked_fill_eq0", "additive_triu", "where_arange", "mask_then_scale", "sdpa_causal",
          "sdpa_bool_tril"}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling_matches(name):
    a = _one(SPELLINGS[name], *_qkv())
    assert a["causal"] == (name in CAUSAL) and a["mask"] == "none"
    want = 0.3 if name in ("mul_scale", "scaled_q", "einsum", "masked_fill_tril", "masked_fill_eq0",
                           "additive_triu", "where_arange", "bart_3d") else D ** -0.5
    assert a["scale"] == pytest.approx(want, rel=1e-6)


def test_fp32_softmax_of_bf16_scores():
    def f(q, k, v):
        s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        s = s.masked_fill(~_tril(), float("-inf"))
        return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v
    a = _one(f, *_qkv(torch.bfloat16), rtol=2e-2, atol=2e-2)
    assert a["causal"] and a["dot_dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_math_path_runs_in_the_inputs_dtype(dtype):
    """SDPA traced to PyTorch's math path (the CPU's, a masked one) upcasts 16-bit Q, K, V to
    fp32 and casts the result back: the kernel runs in the 16-bit dtype, as eager's fused kernels
    do, on the 16-bit tensors (not the fp32 copies, which autograd would save)."""
    q, k, v = _qkv(dtype)
    keep = torch.rand(B, 1, 1, S, generator=torch.Generator().manual_seed(1)) > 0.3
    for fn, args in ((lambda q, k, v: F.scaled_dot_product_attention(q, k, v), (q, k, v)),
                     (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), (q, k, v, keep))):
        compiled, _ = compile_ahead(fn, args, {"target": "cpu"})
        torch.testing.assert_close(compiled(*args)[0], fn(*args), rtol=2e-2, atol=2e-2)
        (n,) = [n for n in compiled.graph.nodes if n.op == "kiln.attention"]
        assert n.attrs["dot_dtype"] == n.attrs["pv_dtype"] == str(dtype).removeprefix("torch.")
        assert all(a.type.dtype == dtype for a in n.args[:3]), [a.type for a in n.args[:3]]


def test_sdpa_math_path_training_saves_16_bit_tensors(monkeypatch):
    """A training step through the math path: what the forward keeps for the backward is bf16
    (Q, K, V and the output, as eager's fused kernels keep), and the gradients match eager's."""
    import kiln
    from kiln.passes import pipeline
    graphs = []
    monkeypatch.setattr(pipeline, "PIPELINE", pipeline.PIPELINE + [("keep", lambda g, o: graphs.append(g) or g)])
    q, k, v = (t.requires_grad_() for t in _qkv(torch.bfloat16))
    keep = torch.rand(B, 1, 1, S, generator=torch.Generator().manual_seed(1)) > 0.3
    fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
    torch._dynamo.reset()
    got = torch.autograd.grad(kiln.compile(fn, target="cpu")(q, k, v, keep).float().square().sum(), (q, k, v))
    want = torch.autograd.grad(fn(q, k, v, keep).float().square().sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)
    (fwd,) = [g for g in graphs if g.meta.get("graph_kind") == "forward"]
    saved = [v.type for v in fwd.output_values() if v.type is not None and v.type.rank == 4]
    assert saved and all(t.dtype == torch.bfloat16 for t in saved), saved


def test_explicit_fp32_attention_stays_fp32():
    """Attention a model writes in fp32 on 16-bit inputs (plain softmax, no SDPA) keeps fp32."""
    q, k, v = _qkv(torch.bfloat16)
    a = _one(lambda q, k, v: (torch.softmax(q.float() @ k.float().transpose(-2, -1) * 0.3, -1) @ v.float())
             .to(q.dtype), q, k, v, rtol=2e-2, atol=2e-2)
    assert a["dot_dtype"] == "float32"


def test_runtime_masks():
    q, k, v = _qkv()
    bias = torch.randn(B, 1, S, S)
    keep = torch.rand(B, 1, 1, S, generator=torch.Generator().manual_seed(1)) > 0.3
    a = _one(lambda q, k, v, m: torch.softmax(q @ k.transpose(-2, -1) * 0.3 + m, -1) @ v, q, k, v, bias)
    assert a["mask"] == "add"
    a = _one(lambda q, k, v, m: torch.softmax((q @ k.transpose(-2, -1) * 0.3).masked_fill(~m, -1e4), -1) @ v,
             q, k, v, keep)
    assert a["mask"] == "bool" and float(a["fill"]) == pytest.approx(-1e4 * 1)
    a = _one(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), q, k, v, keep)
    assert a["mask"] in ("bool", "add")        # SDPA's CPU math turns a bool mask into a bias


def test_gqa_spellings_read_the_unrepeated_heads():
    q, k, v = _qkv(hkv=2)

    def repeat_kv(x):                                   # Hugging Face's expand + reshape
        return x[:, :, None].expand(B, 2, H // 2, S, D).reshape(B, H, S, D)

    for f in (lambda q, k, v: torch.softmax(q @ repeat_kv(k).transpose(-2, -1) * 0.3, -1) @ repeat_kv(v),
              lambda q, k, v: torch.softmax(q @ k.repeat_interleave(2, 1).transpose(-2, -1) * 0.3, -1)
              @ v.repeat_interleave(2, 1),
              lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)):
        a = _one(f, q, k, v)
        assert a["views"][1]["shape"][1] == 2 and a["views"][2]["shape"][1] == 2


class _FusedQKV(torch.nn.Module):
    """GPT-style: one projection, split, heads by view + transpose, merged back after."""
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(H * D, 3 * H * D)

    def forward(self, x):
        q, k, v = self.qkv(x).split(H * D, dim=-1)
        q, k, v = (t.view(B, S, H, D).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax((q @ k.transpose(-2, -1)) * 0.3 + torch.triu(torch.full((S, S), -1e9), 1), -1)
        return (a @ v).transpose(1, 2).reshape(B, S, H * D)


def test_fused_qkv_module_reads_the_projection():
    m = _FusedQKV().eval()
    x = torch.randn(B, S, H * D)
    compiled, report = compile_ahead(m, (x,), {"target": "cpu"})
    torch.testing.assert_close(compiled(x)[0], m(x), rtol=1e-4, atol=1e-5)
    (n,) = [n for n in compiled.graph.nodes if n.op == "kiln.attention"]
    assert n.attrs["causal"] and len({v.name for v in n.inputs()}) == 1     # q, k, v read one tensor


# ---- look-alikes that must not match (and still run correctly) --------------------------------------
LOOKALIKES = {
    "softmax_over_queries": lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), -2) @ v,
    "sigmoid_attention": lambda q, k, v: torch.sigmoid(q @ k.transpose(-2, -1)) @ v,
    "dropout": lambda q, k, v: F.dropout(torch.softmax(q @ k.transpose(-2, -1), -1), 0.5, training=True) @ v,
    "probabilities_returned": lambda q, k, v: (lambda p: (p @ v, p))(torch.softmax(q @ k.transpose(-2, -1), -1)),
    "scores_times_tensor": lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) * q.sum(-1, keepdim=True), -1) @ v,
    "squared_scores": lambda q, k, v: torch.softmax((q @ k.transpose(-2, -1)) ** 2, -1) @ v,
}


@pytest.mark.parametrize("name", list(LOOKALIKES))
def test_lookalike_does_not_match(name):
    fn = LOOKALIKES[name]
    args = _qkv()
    compiled, report = compile_ahead(fn, args, {"target": "cpu"})
    assert not [k for k in report.kernels if k["kind"] == "attention"]
    if name != "dropout":
        got, want = compiled(*args), fn(*args)
        want = want if isinstance(want, tuple) else (want,)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# ---- the layout algebra ------------------------------------------------------------------------------
def test_layout_follows_views_copies_and_gqa():
    t = TensorType((2, 12, 3 * 4 * 8), torch.float32, (288, 24 * 12, 1))  # a [B, S, 3*H*D] projection
    lay = Layout.of(TensorType((2, 12, 96), torch.float32, (1152, 96, 1)))
    k = lay.slice(2, 32, 64).reshape([2, 12, 4, 8]).transpose(1, 2)          # k heads: [B, H, S, D]
    assert k.shape == (2, 4, 12, 8) and k.offset == 32 and [k.single(i) for i in range(4)] == \
        [(2, 1152), (4, 8), (12, 96), (8, 1)]
    g = k.unsqueeze(2).expand([2, 4, 3, 12, 8]).reshape([24, 12, 8])          # GQA repeat + merge
    assert g.dims[0] == [(2, 1152), (4, 8), (3, 0)]
    with pytest.raises(NotAnalysable):
        g.single(0)
    assert t.rank == 3


def test_causal_offset():
    assert causal_offset(torch.ones(4, 4, dtype=torch.bool).tril()) == 0
    assert causal_offset(torch.ones(3, 5, dtype=torch.bool).tril(2)) == 2
    assert causal_offset(torch.ones(2, 4, 4, dtype=torch.bool).tril()) == 0
    assert causal_offset(torch.ones(4, 4, dtype=torch.bool)) is None or True
    m = torch.ones(4, 4, dtype=torch.bool).tril()
    m[3, 0] = False
    assert causal_offset(m) is None


def test_output_in_projection_order_saves_no_copy():
    """SDPA, then transpose(1, 2) + reshape into the output projection: the attention kernel
    writes [B, S, H, D] so the reshape is a view. Training saves no more activation bytes than
    eager (whose CPU flash kernel has that layout too) and gradients match eager."""
    import functools
    from kiln.api import kiln_backend

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(o.transpose(1, 2).reshape(b, n, 32)).relu()

    torch.manual_seed(0)
    m, x = Attn(), torch.randn(2, 16, 32)
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}

    def step(f):
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        m.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = f(x)
        y.square().sum().backward()
        return y, [p.grad.clone() for p in m.parameters()], sum(saved.values())
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=functools.partial(kiln_backend, options={"target": "cpu"}))
    step(compiled)                  # compiles (its first call's saved tensors are not the steady ones)
    y, grads, nbytes = step(compiled)
    y0, grads0, nbytes0 = step(m)
    torch.testing.assert_close(y, y0, rtol=1e-4, atol=1e-5)
    for g, g0 in zip(grads, grads0):
        torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-5)
    assert nbytes <= nbytes0, (nbytes, nbytes0)

"""A causal mask kept in a module buffer (nanoGPT's ``register_buffer("bias", torch.tril(...))``)
reaches the torch.compile backend as a graph input: kiln reads its value at compile time, so the
attention kernel skips the masked blocks instead of reading a mask, and guards the buffer: an
in-place change sends the graph back to eager with a warning, never to a stale answer."""
import gc
import logging

import torch
import torch.nn.functional as F

import kiln
from kiln.runtime.executor import CompiledGraph


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, d=32, heads=4, seq=16):
        super().__init__()
        self.h = heads
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.register_buffer("bias", torch.tril(torch.ones(seq, seq)).view(1, 1, seq, seq))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / (d // self.h) ** 0.5
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, d))


def _attention_nodes():
    gc.collect()
    return [n for g in gc.get_objects() if type(g) is CompiledGraph
            for n in g.graph.nodes if n.op.startswith("kiln.attention")]


def test_buffer_mask_becomes_causal_and_matches_eager():
    torch._dynamo.reset()
    gc.collect()
    torch.manual_seed(0)
    m, x = CausalSelfAttention().eval(), torch.randn(2, 16, 32)
    with torch.no_grad():
        f = kiln.compile(m, target="cpu")
        torch.testing.assert_close(f(x), m(x), rtol=1e-5, atol=1e-5)
    nodes = _attention_nodes()
    assert nodes and all(n.attrs["causal"] and n.attrs["mask"] == "none" for n in nodes)


def test_changed_buffer_falls_back_to_eager(caplog):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m, x = CausalSelfAttention().eval(), torch.randn(2, 16, 32)
    with torch.no_grad():
        f = kiln.compile(m, target="cpu")
        f(x)
        m.bias[..., 0] = 0           # in place: Dynamo's guards do not see it
        m.bias[..., 0, 0] = 1
        with caplog.at_level(logging.WARNING, logger="kiln.attention"):
            got = f(x)
        torch.testing.assert_close(got, m(x), rtol=1e-5, atol=1e-5)
    assert "changed since" in caplog.text


def test_buffer_mask_training_gradients_match_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m, x = CausalSelfAttention(), torch.randn(2, 16, 32, requires_grad=True)
    m(x).square().sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    kiln.compile(m, target="cpu")(x).square().sum().backward()
    for got, w in zip([x.grad] + [p.grad for p in m.parameters()], want):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-5)

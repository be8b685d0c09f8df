"""The attention kernels (Triton, through the interpreter without a GPU; and the cpu target's
math) against float64 eager math at small shapes: forward and backward, causal and not, GQA and
MQA, bool and additive masks (with fully masked rows), head dims that are no power of two,
sequence lengths that are no multiple of the block, Sq != Sk; and end to end, a training step of
a module written the naive way."""
from __future__ import annotations

import math

import pytest
import torch

import kiln
from kiln.ir.attention_op import attention_backward_math, attention_math

# B, H, HKV, SQ, SK, D, DV, causal, causal_offset, mask, dtype
CASES = [
    (1, 2, 2, 40, 40, 16, 16, True, 0, None, torch.float32),
    (2, 4, 2, 33, 33, 24, 24, False, 0, None, torch.float32),
    (1, 4, 1, 17, 40, 16, 8, True, 23, None, torch.float32),
    (1, 2, 2, 40, 40, 16, 16, False, 0, "bool", torch.float32),
    (1, 2, 2, 40, 24, 16, 16, False, 0, "add", torch.float32),
    (1, 2, 1, 32, 32, 32, 32, True, 0, "add", torch.bfloat16),
    (1, 2, 2, 20, 20, 16, 16, False, 0, "bool_finite", torch.float16),
]
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (4e-2, 4e-2), torch.float16: (4e-3, 4e-3)}


def _case(b, h, hkv, sq, sk, d, dv, mask, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, sk, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, sk, dv, generator=g).to(dtype).requires_grad_()
    m, fill = None, float("-inf")
    if mask == "bool":
        m = torch.rand(b, 1, sq, sk, generator=g) > 0.3
    elif mask == "bool_finite":                       # one query row with every key masked
        m = torch.rand(1, h, sq, sk, generator=g) > 0.5
        m[0, 0, 3] = False
        fill = -1e4
    elif mask == "add":
        m = torch.randn(sq, sk, generator=g).to(dtype)
        m[2:5] = float("-inf") if dtype == torch.float32 else torch.finfo(dtype).min
    return q, k, v, m, fill


def _reference(q, k, v, m, scale, causal, off, fill, dout):
    md = None if m is None else (m if m.dtype == torch.bool else m.double())
    qd, kd, vd = (t.detach().double() for t in (q, k, v))
    out, lse = attention_math(qd, kd, vd, md, scale, causal, off, fill)
    return out, attention_backward_math(dout.double(), qd, kd, vd, md, out, lse, scale, causal, off, fill)


def _check(target, b, h, hkv, sq, sk, d, dv, causal, off, mask, dtype):
    q, k, v, m, fill = _case(b, h, hkv, sq, sk, d, dv, mask, dtype)
    scale = 1 / math.sqrt(d)
    torch._dynamo.reset()
    f = kiln.compile(lambda q, k, v: torch.ops.kiln.attention(q, k, v, m, scale, causal, off, fill)[0], target=target)
    out = f(q, k, v)
    assert [kk["target"] for kk in kiln.last_report().kernels if kk["kind"] == "attention"] == [target]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want, want_grads = _reference(q, k, v, m, scale, causal, off, fill, dout)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol * 4)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:9])) + f"-{c[9]}-{str(c[10])[6:]}")
def test_triton_kernels(case):
    _check("triton", *case)


@pytest.mark.parametrize("case", CASES[:1] + CASES[3:5], ids=["causal", "bool", "add"])
def test_cpu_target(case):
    _check("cpu", *case)


def test_tensor_descriptor_variant(monkeypatch):
    """The forward with K and V read through tensor descriptors (TMA on Hopper)."""
    from kiln.codegen import attention_config
    base = attention_config.default_config
    monkeypatch.setattr("kiln.codegen.attention.default_config", lambda *a: {**base(*a), "TMA": 1})
    _check("triton", 1, 4, 2, 33, 33, 16, 16, True, 0, None, torch.float32)


class NaiveCausal(torch.nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, s, e = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(torch.tril(torch.ones(s, s, dtype=torch.bool)) == 0, float("-inf"))
        y = torch.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, s, e))


@pytest.mark.parametrize("target", ["triton", "cpu"])
def test_training_step_naive_module(target, tmp_path):
    torch.manual_seed(0)
    m, x = NaiveCausal(), torch.randn(2, 24, 32)
    report = tmp_path / "r.jsonl"
    torch._dynamo.reset()
    cm = torch.compile(m, backend="kiln", options={"target": target, "report": str(report)})
    cm(x).square().mean().backward()
    got = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m(x).square().mean().backward()
    for g, w in zip(got, [p.grad for p in m.parameters()]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    import json
    kinds = {json.loads(line)["graph_kind"]: [k["target"] for k in json.loads(line)["kernels"]
                                              if k["kind"] == "attention"] for line in report.read_text().splitlines()}
    assert kinds == {"forward": [target], "backward": [target]}


@pytest.mark.parametrize("mask", [None, "bool", "bool_empty_row"])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_forward_is_aten_flash_where_it_agrees(mask, causal, monkeypatch):
    """The cpu target's forward runs ATen's CPU flash kernel for no mask / -inf keep-masks:
    output and log-sum-exp (+inf for a row with no key) as the float64 math gives them."""
    from kiln.ir import attention_op
    calls = []
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    monkeypatch.setattr(attention_op.torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu",
                        lambda *a, **k: calls.append(1) or flash(*a, **k), raising=False)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 16, generator=g), torch.randn(2, 2, 11, 16, generator=g), torch.randn(2, 2, 11, 16, generator=g)
    m = None if mask is None else torch.rand(2, 1, 9, 11, generator=g) > 0.3
    if mask == "bool_empty_row":
        m[0, 0, 3] = False
    out, lse = attention_op.attention_forward(q, k, v, m, 0.3, causal, 0, float("-inf"))
    want, want_lse = attention_math(q.double(), k.double(), v.double(), m, 0.3, causal, 0, float("-inf"))
    assert calls
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse.double(), rtol=1e-5, atol=1e-5)

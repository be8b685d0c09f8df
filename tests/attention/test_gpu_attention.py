"""Attention kernels on a real GPU against eager (skipped without CUDA): the custom op forward and
backward over dtypes, head dims, GQA, causal offsets and masks; the naive pattern and SDPA
compiled end to end (SDPA reaches kiln as _scaled_dot_product_*_attention); a Llama training step.
Where ATen's fused kernels apply, the forward runs them by default (codegen/attention_aten.py):
the ``aten`` parameter runs each case that way and with kiln's Triton forward."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.codegen import attention_aten, attention_config
from kiln.ir.attention_op import attention_backward_math, attention_math

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# B, H, HKV, SQ, SK, D, causal, mask
CASES = [(2, 8, 8, 256, 256, 64, True, None), (2, 8, 2, 200, 200, 128, True, None),
         (1, 4, 1, 77, 300, 80, False, None), (2, 4, 4, 128, 384, 64, True, None),
         (2, 4, 4, 190, 190, 64, False, "bool"), (1, 8, 2, 256, 256, 128, False, "add")]


def _tensors(b, h, hkv, sq, sk, d, mask, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(*s, device="cuda", generator=g, dtype=dtype).requires_grad_()
               for s in ((b, h, sq, d), (b, hkv, sk, d), (b, hkv, sk, d)))
    m = None
    if mask == "bool":
        m = torch.rand(b, 1, sq, sk, device="cuda", generator=g) > 0.2
    elif mask == "add":
        m = torch.randn(1, 1, sq, sk, device="cuda", generator=g, dtype=dtype)
    return q, k, v, m


@pytest.fixture(params=[True, False], ids=["aten", "triton"])
def aten(request, monkeypatch):
    monkeypatch.setattr(attention_config, "ATEN_DEFAULT", request.param)
    return request.param


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_custom_op_forward_backward(case, dtype, aten, caplog):
    b, h, hkv, sq, sk, d, causal, mask = case
    q, k, v, m = _tensors(b, h, hkv, sq, sk, d, mask, dtype)
    off = sk - sq if causal else 0
    scale = 1 / math.sqrt(d)
    torch._dynamo.reset()
    f = kiln.compile(lambda q, k, v: torch.ops.kiln.attention(q, k, v, m, scale, causal, off, -math.inf)[0],
                     target="triton")
    out = f(q, k, v)
    assert [x["target"] for x in kiln.last_report().kernels if x["kind"] == "attention"] == ["triton"]
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    md = None if m is None else (m if m.dtype == torch.bool else m.float())
    qf, kf, vf = (t.detach().float() for t in (q, k, v))
    want, lse = attention_math(qf, kf, vf, md, scale, causal, off, -math.inf)
    want_grads = attention_backward_math(dout.float(), qf, kf, vf, md, want, lse, scale, causal, off, -math.inf)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.float(), w, rtol=5e-2, atol=5e-2)
    _no_fallback(caplog)


def _no_fallback(caplog):
    """The Triton kernels ran (a kernel that fails to compile would fall back to PyTorch math)."""
    assert not [r for r in caplog.records if r.name == "kiln.attention" and r.levelname == "WARNING"]


def naive(q, k, v):
    s = q.shape[-2]
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    att = att.masked_fill(~torch.tril(torch.ones(s, s, dtype=torch.bool, device=q.device)), float("-inf"))
    return torch.softmax(att.float(), dim=-1).to(q.dtype) @ v


@needs_cuda
@pytest.mark.parametrize("fn", [naive, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)],
                         ids=["naive", "sdpa"])
def test_compiled_patterns(fn, aten, caplog):
    q, k, v, _ = _tensors(2, 8, 8, 512, 512, 128, None, torch.bfloat16)
    torch._dynamo.reset()
    got = kiln.compile(fn, target="triton")(q, k, v)
    assert [x["target"] for x in kiln.last_report().kernels if x["kind"] == "attention"] == ["triton"]
    torch.testing.assert_close(got, fn(q, k, v), rtol=2e-2, atol=2e-2)
    _no_fallback(caplog)


@needs_cuda
@pytest.mark.parametrize("causal,hkv,sq,sk,d", [(True, 4, 256, 256, 64), (False, 4, 100, 300, 128),
                                               (True, 4, 333, 333, 80), (True, 1, 256, 256, 128),
                                               (False, 2, 130, 70, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_aten_forward_and_lse(causal, hkv, sq, sk, d, dtype, caplog):
    """ATen's kernels (flash, cuDNN) and kiln's Triton forward give eager's output and the same
    natural-log log-sum-exp (kiln's backward reads it), each run through the launcher; ATen's
    own output tensor comes back where its layout is the output's; cuDNN's backward on the last
    forward's log-sum-exp gives the float32 math's gradients."""
    q, k, v, _ = _tensors(2, 4, hkv, sq, sk, d, None, dtype)
    q, k, v = (t.detach() for t in (q, k, v))
    scale = 1 / math.sqrt(d)
    a = {"kind": "forward", "scale": scale, "causal": causal, "causal_offset": 0, "mask": "none", "fill": "-inf",
         "dot_dtype": str(dtype).removeprefix("torch."), "pv_dtype": str(dtype).removeprefix("torch.")}
    assert attention_aten.applies(a, q, k, v)
    want, want_lse = attention_math(q.float(), k.float(), v.float(), None, scale, causal, 0, -math.inf)
    for kind in attention_aten.KINDS:
        out = torch.empty(2, 4, sq, d, device="cuda", dtype=dtype)
        lse = torch.empty(2, 4, sq, device="cuda", dtype=torch.float32)
        try:
            got, got_lse = attention_aten.run(kind, a, [q, k, v], [out, lse])
        except RuntimeError as e:       # cuDNN's kernel has limits of its own; the launcher falls back
            assert kind == 2, e
            continue
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got_lse, want_lse, rtol=1e-4, atol=1e-3)
        assert got is not out           # the output follows q's layout: bound, not copied
    dout = torch.randn_like(q)
    want_grads = attention_backward_math(dout.float(), q.float(), k.float(), v.float(), None, want, want_lse,
                                         scale, causal, 0, -math.inf)
    outs = [torch.empty_like(t) for t in (q, k, v)]
    assert attention_aten.applies_backward(a, dout, q, k, v, got)
    for g, w in zip(attention_aten.run_backward(a, [dout, q, k, v, got, got_lse], outs), want_grads):
        torch.testing.assert_close(g.float(), w, rtol=5e-2, atol=5e-2)
    for default in (True, False):
        attention_config.ATEN_DEFAULT = default
        try:
            torch._dynamo.reset()
            f = kiln.compile(lambda q, k, v: torch.ops.kiln.attention(q, k, v, None, scale, causal, 0, -math.inf),
                             target="triton")
            got, got_lse = f(q, k, v)
        finally:
            attention_config.ATEN_DEFAULT = True
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got_lse, want_lse, rtol=1e-4, atol=1e-3)
    _no_fallback(caplog)


@needs_cuda
@pytest.mark.parametrize("sq,sk", [(1, 128), (1, 200), (64, 200), (200, 200), (2, 77)])
@pytest.mark.parametrize("hkv", [4, 2])
def test_aten_backward_negative_lse(sq, sk, hkv):
    """cuDNN's backward where cuDNN bugs have given NaN gradients (cudnn-frontend #628, #1072: one
    query row, or a key count off a multiple of 128, with scores so negative that the
    log-sum-exp is below 0): checked against the float32 math wherever kiln would run it."""
    g = torch.Generator(device="cuda").manual_seed(1)
    d, b, h = 64, 2, 4
    u = torch.randn(d, device="cuda", generator=g)
    u = u / u.norm()
    k = (u * 20 + 0.05 * torch.randn(b, hkv, sk, d, device="cuda", generator=g)).to(torch.bfloat16)
    q = (-u * 20 + 0.05 * torch.randn(b, h, sq, d, device="cuda", generator=g)).to(torch.bfloat16)
    v = torch.randn(b, hkv, sk, d, device="cuda", generator=g, dtype=torch.bfloat16)
    scale = 1 / math.sqrt(d)
    a = {"kind": "backward", "scale": scale, "causal": False, "causal_offset": 0, "mask": "none", "fill": "-inf",
         "dot_dtype": "bfloat16", "pv_dtype": "bfloat16"}
    out, lse = attention_math(q.float(), k.float(), v.float(), None, scale, False, 0, -math.inf)
    assert (lse < 0).all()
    out = out.to(torch.bfloat16)
    dout = torch.randn(b, h, sq, d, device="cuda", generator=g, dtype=torch.bfloat16)
    if not attention_aten.applies_backward(a, dout, q, k, v, out):
        pytest.skip("kiln runs its own backward here")
    want = attention_backward_math(dout.float(), q.float(), k.float(), v.float(), None, out.float(), lse, scale,
                                   False, 0, -math.inf)
    got = attention_aten.run_backward(a, [dout, q, k, v, out, lse], [torch.empty_like(t) for t in (q, k, v)])
    for gr, w, name in zip(got, want, "qkv"):
        assert torch.isfinite(gr).all(), f"d{name} has non-finite values"
        torch.testing.assert_close(gr.float(), w, rtol=5e-2, atol=5e-2, msg=f"d{name}")


@needs_cuda
def test_aten_forward_tuned(tmp_path):
    """With autotune the forward's configs, ATen's kernels among them, are timed; the winner is
    remembered and gives eager's answer."""
    q, k, v, _ = _tensors(2, 4, 4, 512, 512, 64, None, torch.bfloat16)
    torch._dynamo.reset()
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    with torch.no_grad():
        got = kiln.compile(fn, target="triton", autotune=True, cache_dir=str(tmp_path))(q, k, v)
        torch.testing.assert_close(got, fn(q, k, v), rtol=2e-2, atol=2e-2)
    import json
    import sqlite3
    with sqlite3.connect(tmp_path / "tuning.sqlite") as db:
        timed = [json.loads(c) for (c,) in db.execute("SELECT config FROM records")]
    assert {c.get("ATEN", 0) for c in timed} >= {2, 1, 0}, timed     # cuDNN, flash and Triton configs timed


@needs_cuda
def test_llama_training_step(caplog):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, intermediate_size=512, vocab_size=256,
                                   max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).cuda()
    ids = torch.randint(0, 256, (2, 128), device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="kiln", options={"target": "triton"})
    compiled(input_ids=ids).logits.float().square().mean().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(input_ids=ids).logits.float().square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=2e-2, atol=2e-4, msg=n)
    _no_fallback(caplog)


@needs_cuda
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_hf_inference(name, caplog):
    transformers = pytest.importorskip("transformers")
    if name == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=256))
    else:
        model = transformers.BertForMaskedLM(transformers.BertConfig(hidden_size=256, num_hidden_layers=2,
                                                                     num_attention_heads=4, intermediate_size=512,
                                                                     vocab_size=256))
    model = model.cuda().eval().to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 128), device="cuda")
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="kiln", options={"target": "triton"})(input_ids=ids).logits
        want = model(input_ids=ids).logits
    assert [x["target"] for x in kiln.last_report().kernels if x["kind"] == "attention"] == ["triton"] * 2
    torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)
    _no_fallback(caplog)

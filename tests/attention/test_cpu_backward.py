"""The cpu target's attention backward: ATen's CPU flash-attention backward where the forward ran
ATen's forward (no mask; causal or not; GQA by expanding heads and summing their gradients), the
math otherwise; both against float64 autograd through eager SDPA."""
import pytest
import torch

from kiln.ir.attention_op import attention_backward_cpu, attention_forward


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hkv", [4, 2, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_backward_matches_float64_autograd(dtype, tol, causal, hkv, masked):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 33, 16, dtype=dtype)
    k, v = torch.randn(2, hkv, 33, 16, dtype=dtype), torch.randn(2, hkv, 33, 16, dtype=dtype)
    mask = torch.rand(2, 1, 33, 33) > 0.3 if masked else None
    if mask is not None:
        mask[..., 0] = True                     # no empty row: eager SDPA gives NaN there
    out, lse = attention_forward(q, k, v, mask, 0.25, causal, 0)
    dout = torch.randn_like(out)
    got = attention_backward_cpu(dout, q, k, v, mask, out, lse, 0.25, causal, 0, float("-inf"))
    qq, kk, vv = (t.double().requires_grad_() for t in (q, k, v))
    rep = 4 // hkv
    o = torch.nn.functional.scaled_dot_product_attention(
        qq, kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1), attn_mask=mask, is_causal=causal, scale=0.25)
    o.backward(dout.double())
    for g, r in zip(got, (qq.grad, kk.grad, vv.grad)):
        assert g.shape == r.shape and g.dtype == dtype
        assert ((g.double() - r).abs().max() / r.abs().max()).item() < tol

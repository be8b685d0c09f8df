"""``kiln::attention`` and ``kiln::attention_backward``: scaled dot-product attention as one op.

Why an op: the attention pass (passes/attention.py) puts it in place of a recognised attention
pattern before AOTAutograd, so the forward graph holds one ``kiln.attention.default`` node and
the backward graph one ``kiln.attention_backward.default`` node, each of which codegen turns
into one flash-style kernel. The eager implementations here are the exact math in PyTorch: the
reference the kernels are checked against and what the CPU target runs.

Semantics (shared by the Triton kernels): q [B, H, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv]
with H % Hkv == 0 (query head h reads key/value head h // (H // Hkv), as SDPA's enable_gqa);
scores = q kᵀ * scale; ``mask`` broadcastable to [B, H, Sq, Sk] is additive when floating and
a keep-mask when bool (False -> ``fill``); ``causal`` keeps key j for query i iff
j <= i + causal_offset. With a mask, finite scores below FLOOR (-1e4) count as FLOOR: they weigh
0 unless the whole row is masked (then the row is uniform, as eager's finfo.min masks give) and
the log-sum-exp stays exact enough for the backward. Rows with no key left (all -inf) give zeros
(as SDPA's safe softmax). Returns the
output (q's dtype) and the log-sum-exp of each row (float32 [B, H, Sq]; +inf for empty rows),
which the backward reuses.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _expand_heads(t: Tensor, heads: int) -> Tensor:
    rep = heads // t.shape[1]
    return t.repeat_interleave(rep, dim=1) if rep > 1 else t


def _acc(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


FLOOR = -1e4


def _scores(q, k, mask, scale, causal, causal_offset, fill):
    f = _acc(q)
    s = (q.to(f) @ _expand_heads(k, q.shape[1]).to(f).transpose(-1, -2)) * scale
    if mask is not None:
        s = torch.where(mask, s, fill) if mask.dtype == torch.bool else s + mask.to(f)
        s = torch.where((s < FLOOR) & (s > float("-inf")), FLOOR, s)
    if causal:
        sq, sk = s.shape[-2:]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril(causal_offset)
        s = s.masked_fill(~keep, float("-inf"))
    return s


def attention_math(q, k, v, mask=None, scale=1.0, causal=False, causal_offset=0, fill=float("-inf")):
    """Reference forward in float32: (out in q's dtype, lse float32 [B, H, Sq])."""
    s = _scores(q, k, mask, scale, causal, causal_offset, fill)
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    out = (p / torch.where(l == 0, 1.0, l)) @ _expand_heads(v, q.shape[1]).to(p.dtype)
    lse = torch.where(l == 0, float("inf"), m + torch.log(l)).squeeze(-1)
    return out.to(q.dtype), lse.float()


def _aten_flash_cpu(q, k, v, mask, causal, causal_offset, fill) -> bool:
    """Does ATen's CPU flash-attention kernel compute what kiln::attention means here?"""
    return q.device.type == "cpu" and (not causal or causal_offset == 0) \
        and (mask is None or (mask.dtype == torch.bool and fill == float("-inf"))) \
        and q.dtype in (torch.float32, torch.bfloat16) and k.dtype == v.dtype == q.dtype \
        and q.shape[-1] == v.shape[-1] and q.shape[2] > 0 and k.shape[2] > 0


def attention_forward(q, k, v, mask=None, scale=1.0, causal=False, causal_offset=0, fill=float("-inf")):
    """What the cpu target runs: ATen's CPU flash-attention kernel (it returns the same
    log-sum-exp) where it computes the same thing, else the math above (its score tensor makes
    it several times slower than eager's softmax on the CPU). Same thing: no mask, or a keep-mask
    whose fill is -inf (as an additive 0/-inf mask; a row with no key gives zeros there too, its
    lse set to +inf here); causal aligned top-left. One difference, as in eager: kept scores
    below FLOOR are not raised to it, which matters only for a row whose every kept score is
    below -1e4."""
    if _aten_flash_cpu(q, k, v, mask, causal, causal_offset, fill):
        h = q.shape[1]
        bias = None if mask is None else torch.zeros((), dtype=q.dtype).masked_fill(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, _expand_heads(k, h), _expand_heads(v, h), 0.0, bool(causal), attn_mask=bias, scale=float(scale))
        lse = lse.float()
        if mask is not None:
            keep = mask.broadcast_to((*q.shape[:3], k.shape[2]))
            if causal:
                keep = keep & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
            lse = lse.masked_fill(~keep.any(-1), float("inf"))
        return out, lse
    return attention_math(q, k, v, mask, scale, causal, causal_offset, fill)


def _fold_heads(t: Tensor, hkv: int) -> Tensor:
    """[B, H, S, D] -> [B, Hkv, S, D]: a key/value head's gradient summed over the query heads sharing it."""
    h = t.shape[1]
    return t.view(t.shape[0], hkv, h // hkv, *t.shape[2:]).sum(2) if h != hkv else t


def attention_backward_cpu(dout, q, k, v, mask, out, lse, scale, causal, causal_offset, fill):
    """What the cpu target runs: ATen's CPU flash-attention backward where the forward ran its
    forward without a mask (the log-sum-exp is then that kernel's own), else the math below (its
    score and probability tensors made a GPT-2 training step's backward several times slower)."""
    if mask is None and _aten_flash_cpu(q, k, v, mask, causal, causal_offset, fill) \
            and dout.dtype == q.dtype and out.dtype == q.dtype:
        h = q.shape[1]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, _expand_heads(k, h), _expand_heads(v, h), out, lse.to(torch.float32), 0.0, bool(causal),
            scale=float(scale))
        return dq, _fold_heads(dk, k.shape[1]), _fold_heads(dv, v.shape[1])
    return attention_backward_math(dout, q, k, v, mask, out, lse, scale, causal, causal_offset, fill)


def attention_backward_math(dout, q, k, v, mask, out, lse, scale, causal, causal_offset, fill):
    """Reference backward: (dq, dk, dv); key/value gradients summed over the query heads that share them."""
    h, hkv = q.shape[1], k.shape[1]
    s = _scores(q, k, mask, scale, causal, causal_offset, fill)
    p = torch.exp(s - lse.to(s.dtype).unsqueeze(-1))
    do, vf = dout.to(s.dtype), _expand_heads(v, h).to(s.dtype)
    dv = p.transpose(-1, -2) @ do
    dp = do @ vf.transpose(-1, -2)
    delta = (do * out.to(s.dtype)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    if mask is not None and mask.dtype == torch.bool:      # masked scores are the fill: no gradient
        ds = torch.where(mask, ds, 0.0)
    dq = ds @ _expand_heads(k, h).to(s.dtype)
    dk = ds.transpose(-1, -2) @ q.to(s.dtype)

    return dq.to(q.dtype), _fold_heads(dk, hkv).to(k.dtype), _fold_heads(dv, hkv).to(v.dtype)


def _out(q: Tensor, v: Tensor, bshd: bool) -> Tensor:
    b, h, sq, _ = q.shape
    return q.new_empty((b, sq, h, v.shape[-1])).transpose(1, 2) if bshd else q.new_empty((b, h, sq, v.shape[-1]))


@torch.library.custom_op("kiln::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
              causal_offset: int, fill: float, out_bshd: bool = False) -> tuple[Tensor, Tensor]:
    """``out_bshd``: the output's memory holds [B, S, H, D] (as FlashAttention's), so a graph
    traced with that layout (a following transpose + view) stays valid."""
    out, lse = attention_forward(q, k, v, mask, scale, causal, causal_offset, fill)
    return _out(q, v, out_bshd).copy_(out), lse.contiguous()


@attention.register_fake
def _(q, k, v, mask, scale, causal, causal_offset, fill, out_bshd=False):
    b, h, sq, _ = q.shape
    return _out(q, v, out_bshd), q.new_empty((b, h, sq), dtype=torch.float32)


@torch.library.custom_op("kiln::attention_backward", mutates_args=())
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], out: Tensor,
                       lse: Tensor, scale: float, causal: bool, causal_offset: int,
                       fill: float) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = attention_backward_cpu(dout, q, k, v, mask, out, lse, scale, causal, causal_offset, fill)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_backward.register_fake
def _(dout, q, k, v, mask, out, lse, scale, causal, causal_offset, fill):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup(ctx, inputs, output):
    q, k, v, mask, scale, causal, causal_offset, fill, _ = inputs
    ctx.save_for_backward(q, k, v, mask, *output)
    ctx.params = (scale, causal, causal_offset, fill)


def _backward(ctx, dout, dlse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward(dout, q, k, v, mask, out, lse, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup)

OP = "kiln.attention.default"
BACKWARD_OP = "kiln.attention_backward.default"

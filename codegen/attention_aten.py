"""ATen's fused attention kernels as implementations of kiln's attention forward on a GPU.

As cuBLAS is to the matmul template, so cuDNN's attention kernel is to kiln's Triton forward:
faster where it applies (H200, B4 H32 S2048 D128 causal bf16: cuDNN 0.27-0.28 ms, kiln's Triton
kernel 0.36, ATen's FlashAttention-2 0.49; bench/RESULTS.md), so the launcher may run one of
ATen's kernels instead (config key ``ATEN``: 1 flash, 2 cuDNN; attention_config.ATEN_DEFAULT)
and the tuner times them beside the Triton configs.

They apply where they compute what ``kiln::attention`` means: no mask tensor, causal aligned
top-left (offset 0) or not causal, float16/bfloat16 throughout, one head dim (a multiple of 8 up
to 256), unit inner strides, and query heads a multiple of key/value heads (GQA: both kernels
take fewer key/value heads), on the GPUs where they were measured and tested against eager:
Hopper (sm_90, ``ARCHS``; on sm_100 cuDNN's attention silently corrupts GQA outputs,
pytorch/pytorch#193893). Their log-sum-exp is the natural-log one kiln's backward kernel
reads; the backward runs cuDNN's (``run_backward``) on that log-sum-exp, whichever forward
made it.
"""
from __future__ import annotations

import torch

KINDS = {1: "flash", 2: "cudnn"}
ARCHS = {(9, 0)}        # compute capabilities where they run


def applies(a: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Does an ATen kernel compute this forward exactly as kiln's kernel would?"""
    d = q.shape[-1]
    return a["kind"] == "forward" and a["mask"] == "none" and (not a["causal"] or a["causal_offset"] == 0) \
        and q.is_cuda and torch.cuda.get_device_capability(q.device) in ARCHS \
        and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype \
        and k.shape[-1] == v.shape[-1] == d and d % 8 == 0 and d <= 256 and q.shape[1] % k.shape[1] == 0 \
        and min(q.shape[2], k.shape[2]) > 0 and all(t.stride(-1) == 1 for t in (q, k, v))


def _call(kind: int, a: dict, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    scale, causal = float(a["scale"]), bool(a["causal"])
    if kind == 2:
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    else:
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return r[0], r[1]


def applies_backward(a: dict, dout, q, k, v, out) -> bool:
    """Does cuDNN's backward compute this one? (The forward's conditions, one dtype for the
    gradient and the output, unit inner strides.)"""
    return applies({**a, "kind": "forward"}, q, k, v) and dout.dtype == out.dtype == q.dtype \
        and dout.stride(-1) == 1 and out.stride(-1) == 1


def _deliver(results, outputs: list) -> list[torch.Tensor]:
    """The tensors that hold the results: ATen's own where their layout is the output's (the
    executor binds them instead of the planned buffers: no copy), else the planned outputs,
    copied into."""
    res = []
    for got, dst in zip(results, outputs):
        if not (got.shape == dst.shape and got.stride() == dst.stride() and got.dtype == dst.dtype):
            dst.copy_(got.reshape(dst.shape))
            got = dst
        res.append(got)
    return res


def run(kind: int, a: dict, ts: list, outputs: list) -> list[torch.Tensor]:
    """The forward on ATen's kernel ``kind``: [out, lse]."""
    out, lse = _call(kind, a, *ts[:3])
    lse = lse.reshape(*lse.shape[:2], -1)[:, :, :outputs[1].shape[2]]     # cuDNN's is [B, H, S, 1]
    return _deliver((out, lse), outputs)


_UNUSED: dict = {}


def run_backward(a: dict, ts: list, outputs: list) -> list[torch.Tensor]:
    """The backward on cuDNN's kernel: [dq, dk, dv] from (dout, q, k, v, out, lse), the lse kiln's
    or an ATen forward's (the same natural-log log-sum-exp)."""
    dout, q, k, v, out, lse = ts[:6]
    if q.device not in _UNUSED:     # the dropout seed and offset: never read without dropout
        _UNUSED[q.device] = tuple(torch.empty((), dtype=torch.int64, device=q.device) for _ in range(2))
    seed, offset = _UNUSED[q.device]
    grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.unsqueeze(-1), seed, offset, None, None, None, q.shape[2], k.shape[2], 0.0,
        bool(a["causal"]), scale=float(a["scale"]))
    return _deliver(grads, outputs)

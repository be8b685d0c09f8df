"""Grids and arguments of the attention kernels: ``run(config, tensors, outputs)`` launchers for
the forward (one program per query block and head) and the backward (delta, then dK/dV per key
block and key/value head, then dQ per query block and head)."""
from __future__ import annotations

import torch

from . import attention_aten
from .attention_config import block_d


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _opts(cfg: dict, interpret: bool) -> dict:
    return {} if interpret else {"num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 2)}


def _mask_args(mask, fallback):
    if mask is None:
        return fallback, (0, 0, 0, 0), 0
    return mask, mask.stride(), 1 if mask.dtype == torch.bool else 2


def tma_ok(*ts) -> bool:
    """Tensor descriptors need unit inner strides and 16-byte aligned rows and bases."""
    return all(t.stride(-1) == 1 and (t.stride(-2) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in ts)


_ALLOCATOR = []


def _allocator() -> None:
    """Device-side tensor descriptors take their scratch space from Triton's allocator."""
    if not _ALLOCATOR:
        import triton
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"
                                                                      if torch.cuda.is_available() else "cpu"))
        _ALLOCATOR.append(True)


def forward_launcher(module, entry: str, a: dict, interpret: bool):
    """``module(tma, ws)``: the rendered kernel module (with TMA loads or without, with a
    warp-specialised key loop or without). A config with ``ATEN`` runs ATen's kernel instead and
    returns the tensors holding the results (attention_aten.run)."""
    scale, causal, off, fill = a["scale"], a["causal"], a["causal_offset"], float(a["fill"])

    def run(cfg, ts, outputs):
        if cfg.get("ATEN"):
            return attention_aten.run(cfg["ATEN"], a, ts, outputs)
        q, k, v = ts[:3]
        tma = bool(cfg.get("TMA")) and tma_ok(k, v)
        if tma:
            _allocator()
        fn = getattr(module(tma, bool(cfg.get("WS")) and not interpret), entry)
        mask, mstr, kind = _mask_args(ts[3] if len(ts) > 3 else None, q)
        out, lse = outputs
        b, h, sq, d = q.shape
        hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        grid = (_cdiv(sq, bm), b * h)
        fn[grid](q, k, v, mask, out, lse, *q.stride(), *k.stride(), *v.stride(), *mstr, *out.stride(),
                 *lse.stride(), h, h // hkv, sq, sk, scale, fill, off,
                 HEAD_D=d, HEAD_DV=dv, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d(d), BLOCK_DV=block_d(dv),
                 CAUSAL=causal, MASK_KIND=kind, EVEN_M=sq % bm == 0, EVEN_N=sk % bn == 0,
                 SAFE=kind != 0 or off < 0, **_opts(cfg, interpret))
    return run


def backward_launcher(mod, entry: str, a: dict, interpret: bool):
    f_delta, f_dkdv, f_dq = (getattr(mod, f"{entry}_{s}") for s in ("delta", "dkdv", "dq"))
    scale, causal, off, fill = a["scale"], a["causal"], a["causal_offset"], float(a["fill"])

    def run(cfg, ts, outputs):
        if cfg.get("ATEN"):
            return attention_aten.run_backward(a, ts, outputs)
        dout, q, k, v, out, lse = ts[:6]
        mask, mstr, kind = _mask_args(ts[6] if len(ts) > 6 else None, q)
        dq, dk, dv_ = outputs
        b, h, sq, d = q.shape
        hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        delta = torch.empty(b * h * sq, dtype=torch.float32, device=q.device)
        f_delta[(_cdiv(sq, 64), b * h)](out, dout, delta, *out.stride(), *dout.stride(), h, sq,
                                        HEAD_DV=dv, BLOCK_M=64, BLOCK_DV=block_d(dv))
        edge = causal or sq % bm != 0 or sk % bn != 0
        common = (*q.stride(), *k.stride(), *v.stride(), *mstr, *dout.stride(), *lse.stride())
        consts = dict(HEAD_D=d, HEAD_DV=dv, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d(d), BLOCK_DV=block_d(dv),
                      CAUSAL=causal, MASK_KIND=kind, EDGE=edge, **_opts(cfg, interpret))
        f_dkdv[(_cdiv(sk, bn), b * hkv)](q, k, v, mask, dout, lse, delta, dk, dv_, *common, *dk.stride(),
                                         *dv_.stride(), h, hkv, h // hkv, sq, sk, scale, fill, off, **consts)
        f_dq[(_cdiv(sq, bm), b * h)](q, k, v, mask, dout, lse, delta, dq, *common, *dq.stride(), h, h // hkv,
                                     sq, sk, scale, fill, off, **consts)
    return run

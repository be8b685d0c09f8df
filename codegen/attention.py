"""Attention kernels for ``kiln.attention`` (forward) and ``kiln.attention_bwd`` nodes.

Target triton (or cuda: attention has no CUDA C template, so a GPU runs the Triton kernel):
the FlashAttention-2 templates attention_fwd.py.j2 / attention_bwd.py.j2, rendered for the
node's dtypes; where cuDNN's kernels compute the same attention on a Hopper GPU the launcher runs
those by default instead, and the tuner times both (attention_aten.py). Target cpu (and dtypes Triton's dot lacks, float64): the exact math of
kiln.ir.attention_op in PyTorch. Each input reaches the kernel as the [B, heads, S, D] view the
pass recorded in ``attrs["views"]``, taken on the input conformed to its IR layout; strides are
runtime arguments, so any view works without a copy.
"""
from __future__ import annotations

import logging
import os

import torch

from . import attention_aten
from .attention_config import block_d, default_config
from .cache import source_path
from .kernel import Kernel
from .loader import _conform, _import
from .templates import ENV

log = logging.getLogger("kiln.attention")
_TL = {"float16": "tl.float16", "bfloat16": "tl.bfloat16", "float32": "tl.float32"}
REFERENCE = "# runs kiln.ir.attention_op.{entry} (PyTorch): {desc}\n"


def _describe(a: dict) -> str:
    return (f"{a['kind']} scale={a['scale']:.6g} causal={a['causal']}(+{a['causal_offset']}) mask={a['mask']} "
            f"fill={a['fill']} dot={a['dot_dtype']}/{a['pv_dtype']} views={a['views']}")


def render(a: dict, tma: bool = False, ws: bool = False) -> tuple[str, str]:
    """Source and entry; ``tma``: the forward reads K and V through tensor descriptors; ``ws``:
    its key loop is warp-specialised (Triton splits loads and math between warp groups)."""
    fwd = a["kind"] == "forward"
    entry = "attn_fwd" if fwd else "attn_bwd"
    ieee = a["dot_dtype"] == "float32" and not torch.backends.cuda.matmul.allow_tf32
    # the Triton interpreter's dot misreads bfloat16 operands: it multiplies their float32 values
    interp = not torch.cuda.is_available()
    tl_of = lambda d: "tl.float32" if interp and d == "bfloat16" else _TL[d]  # noqa: E731
    src = ENV.get_template("attention_fwd.py.j2" if fwd else "attention_bwd.py.j2").render(
        entry=entry, dot_dtype=tl_of(a["dot_dtype"]), pv_dtype=tl_of(a["pv_dtype"]),
        precision=', input_precision="ieee"' if ieee else "", tma=tma and fwd, ws=ws and fwd)
    return src, entry


def build(node, target: str, cache_dir: str, autotune: bool = False) -> Kernel:
    a = {k: v for k, v in node.attrs.items() if k not in ("name", "ops")}
    triton_ok = target in ("triton", "cuda") and a["dot_dtype"] in _TL and a["pv_dtype"] in _TL
    if triton_ok:
        src, entry = render(a)
    else:
        entry = "attention_forward" if a["kind"] == "forward" else "attention_backward_cpu"
        src = REFERENCE.format(entry=entry, desc=_describe(a))
    meta = {"launcher": "attention", "attrs": a, "cache_dir": cache_dir, "autotune": bool(autotune)}
    ops = list(node.attrs.get("ops") or [node.op])
    return Kernel(node.attrs.get("name", "attention"), "attention", "triton" if triton_ok else "cpu", ops, src,
                  entry, meta)


def _views(inputs, views) -> list[torch.Tensor]:
    out = []
    for t, v in zip(inputs, views):
        t = _conform(t, tuple(v["ir_strides"]))
        out.append(t.as_strided(v["shape"], v["strides"], t.storage_offset() - v["ir_offset"] + v["offset"]))
    return out


def load(k: Kernel) -> None:
    a = k.meta["attrs"]
    if k.target != "triton":
        k.launcher = _math_launcher(a)
        return
    interpret = not torch.cuda.is_available()
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    cache_dir = k.meta.get("cache_dir") or os.path.expanduser("~/.cache/kiln")
    mods: dict = {}

    def module(tma: bool = False, ws: bool = False):
        if (tma, ws) not in mods:
            src = render(a, tma, ws)[0] if tma or ws else k.source
            mods[tma, ws] = _import(source_path(cache_dir, src, "triton"))
        return mods[tma, ws]
    from .attention_launch import backward_launcher, forward_launcher
    run = (forward_launcher(module, k.entry, a, interpret) if a["kind"] == "forward"
           else backward_launcher(module(), k.entry, a, interpret))
    state: dict = {}

    def launch(inputs, outputs):
        ts = _views(inputs, a["views"])
        cfg = state.get("cfg")
        if cfg is None:
            try:            # the first launch compiles: a kernel Triton rejects runs as exact math
                cfg, res = _first_run(k, a, _config(k, a, ts, outputs, run, interpret), ts, outputs, run, interpret)
            except Exception as e:      # noqa: BLE001
                log.warning("attention kernel %s failed to compile or launch (%s: %s); running it as PyTorch math",
                            k.name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                k.meta["fallback"] = f"{type(e).__name__}"
                k.launcher = _math_launcher(a)
                return k.launcher(inputs, outputs)
            state["cfg"] = cfg
            return res
        return run(cfg, ts, outputs)
    k.launcher = launch


def _first_run(k: Kernel, a: dict, cfg: dict, ts, outputs, run, interpret: bool) -> tuple[dict, object]:
    """The first launch: (the config kept, what the launch returned). An ATen kernel that refuses
    the problem (cuDNN has limits of its own) hands it to kiln's Triton kernel."""
    try:
        return cfg, run(cfg, ts, outputs)
    except RuntimeError as e:
        if not cfg.get("ATEN"):
            raise
        log.info("attention kernel %s: ATen's %s kernel refused the problem (%s); running kiln's Triton kernel",
                 k.name, attention_aten.KINDS[cfg["ATEN"]], str(e).splitlines()[0] if str(e) else "")
        q, kk = (ts[0], ts[1]) if a["kind"] == "forward" else (ts[1], ts[2])
        itemsize = torch.empty((), dtype=getattr(torch, a["dot_dtype"])).element_size()
        cfg = default_config(a["kind"], q.shape[2], kk.shape[2], q.shape[3], itemsize, interpret)
        return cfg, run(cfg, ts, outputs)


def _math_launcher(a: dict):
    """kiln.ir.attention_op's forward and backward (the cpu target, and the fallback)."""
    from kiln.ir.attention_op import attention_backward_cpu, attention_forward
    params = (a["scale"], a["causal"], a["causal_offset"], float(a["fill"]))

    def launch(inputs, outputs):
        ts = _views(inputs, a["views"])
        if a["kind"] == "forward":
            res = attention_forward(*ts[:3], ts[3] if len(ts) > 3 else None, *params)
        else:
            dout, q, kk, v, o, lse = ts[:6]
            res = attention_backward_cpu(dout, q, kk, v, ts[6] if len(ts) > 6 else None, o, lse, *params)
        for dst, r in zip(outputs, res):
            dst.copy_(r)
    return launch


def _config(k: Kernel, a: dict, ts, outputs, run, interpret: bool) -> dict:
    q, kk = (ts[0], ts[1]) if a["kind"] == "forward" else (ts[1], ts[2])
    sq, sk, d = q.shape[2], kk.shape[2], q.shape[3]
    itemsize = torch.empty((), dtype=getattr(torch, a["dot_dtype"])).element_size()
    aten = not interpret and (attention_aten.applies(a, *ts[:3]) if a["kind"] == "forward"
                              else attention_aten.applies_backward(a, *ts[:5]))
    cfg = default_config(a["kind"], sq, sk, d, itemsize, interpret, aten)
    if k.meta.get("config") and (aten or not k.meta["config"].get("ATEN")):
        return dict(k.meta["config"])
    if interpret or not k.meta.get("autotune"):
        return cfg
    from kiln.autotune.space import Problem
    from kiln.autotune.tuner import tune_launch
    fam = "attention_fwd" if a["kind"] == "forward" else "attention_bwd"
    prob = Problem(fam, {"B": q.shape[0], "H": q.shape[1], "SQ": sq, "SK": sk, "D": block_d(d)},
                   getattr(torch, a["dot_dtype"]), {"causal": a["causal"], "aten": aten})
    res = tune_launch(k.source, prob, [*ts, *outputs], lambda c: run(c, ts, outputs),
                      k.meta.get("cache_dir") or "", baseline=cfg)
    k.meta["tuning_s"] = k.meta.get("tuning_s", 0.0) + res.seconds
    k.meta["config"] = res.config
    return res.config

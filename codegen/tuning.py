"""Compile-time tuning: after codegen, each GPU kernel whose launcher can tune (``launcher.tune``)
is tuned on random tensors of its node's types, so no user data is needed and the compile report
can say how long tuning took. Integer inputs are ones (a safe index or divisor); floats are
normal samples. Kernels already in the tuning database cost one lookup."""
from __future__ import annotations

import logging

import torch

from kiln.ir import Graph
from kiln.ir.ops import is_kernel_op
from .kernel import Kernel

log = logging.getLogger("kiln.autotune")


def _sample(t, device) -> torch.Tensor:
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.strides)) if all(t.shape) else 0
    if t.dtype.is_floating_point or t.dtype.is_complex:
        base = torch.randn(span, device=device, dtype=t.dtype)
    elif t.dtype == torch.bool:
        base = torch.zeros(span, device=device, dtype=t.dtype)
    else:
        base = torch.ones(span, device=device, dtype=t.dtype)
    return base.as_strided(t.shape, t.strides)


def tune_kernels(graph: Graph, kernels: dict[str, Kernel], device: str = "cuda") -> float:
    """Tune every tunable kernel of ``graph`` on ``device``; returns the seconds spent tuning
    (0.0 when every kernel came from the database). The compile may run under a tracing mode
    (AOTAutograd calls its compilers inside FakeTensorMode), so tensors are made outside it."""
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes():
        return _tune_all(graph, kernels, device)


def _tune_all(graph: Graph, kernels: dict[str, Kernel], device: str) -> float:
    from . import load_kernel
    total = 0.0
    for n in graph.nodes:
        if not is_kernel_op(n.op):
            continue
        k = kernels[n.outputs[0].name]
        if k.target not in ("triton", "cuda"):
            continue
        if k.launcher is None:
            load_kernel(k)
        tune = getattr(k.launcher, "tune", None)
        values = (*n.args, *n.outputs)
        if tune is None or any(v.type is None or not str(v.type.device).startswith("cuda") for v in values):
            continue
        ins = [_sample(v.type, device) for v in n.args]
        outs = [torch.empty_strided(v.type.shape, v.type.strides, dtype=v.type.dtype, device=device)
                for v in n.outputs]
        if outs and outs[0].numel() == 0:
            continue
        try:
            total += tune(ins, outs)
        except Exception as e:      # noqa: BLE001 - tuning is an optimisation: keep the default config
            log.warning("tuning %s failed (%s: %s); it keeps its default launch config", k.name, type(e).__name__, e)
        del ins, outs
    return total

"""Where kiln's attention forward may run ATen's fused kernels instead of its Triton kernel
(codegen/attention_aten.py): the untuned default, the tuner's space, and how the executor takes
the tensors such a kernel returns. The kernels themselves run only on a GPU
(tests/attention/test_gpu_attention.py)."""
from __future__ import annotations

import pytest
import torch

from kiln.autotune.space import DeviceLimits, Problem, prune
from kiln.codegen import attention_aten, attention_config
from kiln.runtime.executor import CompiledGraph

A = {"kind": "forward", "scale": 0.125, "causal": True, "causal_offset": 0, "mask": "none", "fill": "-inf",
     "dot_dtype": "bfloat16", "pv_dtype": "bfloat16"}


def test_default_config_takes_aten_where_it_applies(monkeypatch):
    assert attention_config.default_config("forward", 2048, 2048, 128, 2, False, aten=True)["ATEN"] == 2
    assert not attention_config.default_config("forward", 2048, 2048, 128, 2, False).get("ATEN")
    assert attention_config.default_config("backward", 2048, 2048, 128, 2, False, aten=True)["ATEN"] == 2
    assert not attention_config.default_config("forward", 64, 64, 64, 2, True, aten=True).get("ATEN")  # interpreter
    monkeypatch.setattr(attention_config, "ATEN_DEFAULT", False)
    assert not attention_config.default_config("forward", 2048, 2048, 128, 2, False, aten=True).get("ATEN")


def _space(aten: bool, family: str = "attention_fwd"):
    p = Problem(family, {"B": 4, "H": 32, "SQ": 2048, "SK": 2048, "D": 128}, torch.bfloat16,
                {"causal": True, "aten": aten})
    return [c.get("ATEN", 0) for c in prune(p, DeviceLimits())[0]]


def test_tuner_times_aten_kernels_only_where_they_apply():
    kept = _space(True)
    assert kept.count(1) == 1 and kept.count(2) == 1 and kept.count(0) > 10
    assert set(_space(False)) == {0}
    assert sorted(set(_space(True, "attention_bwd"))) == [0, 2]       # the backward: cuDNN's only


def test_aten_does_not_apply_off_the_gpu_or_to_what_it_would_change():
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    assert not attention_aten.applies(A, q, q, q)       # a CPU tensor: the cpu target has its own path
    for change in ({"mask": "bool"}, {"causal_offset": 3}, {"kind": "backward"}):
        assert not attention_aten.applies({**A, **change}, q, q, q)
    assert not attention_aten.applies_backward(A, q, q, q, q, q)


def test_executor_binds_returned_tensors_and_fills_arena_buffers():
    planned = [torch.zeros(4), torch.zeros(2)]
    arena_view = planned[1]
    got = [torch.ones(4), torch.full((2,), 2.0)]
    outs = [("o", (4,), (1,), torch.float32), ("lse", (2,), (1,), torch.float32)]
    res = CompiledGraph._bind(outs, list(planned), got, {"lse": arena_view})
    assert res[0] is got[0]                                  # not in the arena: ATen's tensor is bound
    assert res[1] is arena_view and torch.equal(arena_view, got[1])   # in the arena: copied in


def test_a_refused_problem_falls_back_to_kilns_kernel():
    """cuDNN has limits of its own: where it raises on the first launch, the launcher keeps kiln's
    Triton config for this kernel (the stub stands in for the launcher's ``run``)."""
    from kiln.codegen.attention import _first_run
    from kiln.codegen.kernel import Kernel
    tried = []

    def run(cfg, ts, outputs):
        tried.append(dict(cfg))
        if cfg.get("ATEN"):
            raise RuntimeError("cuDNN Frontend error: No valid execution plans built")
        return "ran"
    q = torch.empty(1, 2, 48, 64)
    cfg, res = _first_run(Kernel("attn", "attention", "triton", [], "", "attn_fwd"), A,
                          dict(attention_config.ATEN_CONFIGS[0]), [q, q, q], [], run, True)
    assert res == "ran" and not cfg.get("ATEN") and [c.get("ATEN", 0) for c in tried] == [2, 0]
    def fails(*_):
        raise RuntimeError("out of resources")
    with pytest.raises(RuntimeError, match="out of resources"):     # kiln's own kernel: the caller runs the math
        _first_run(Kernel("attn", "attention", "triton", [], "", "attn_fwd"), A, cfg, [q, q, q], [], fails, True)

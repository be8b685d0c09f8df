"""Type inference runs ops on meta tensors, which forget their device: inferred types take the
operands' device. (Passes that add nodes, such as hoist_unsqueeze and the attention rewrite's
log-sum-exp, typed their outputs "cpu" in CUDA graphs, and a graph with values on two devices
never takes the memory planner's dynamic mode: GPT-2's training peak on an H200 went from 0.66x
to 1.06x eager's.)"""
import dataclasses

import torch

from kiln.ir import TensorType, Value
from kiln.ir.ops import infer


def _on(device, *shape):
    return dataclasses.replace(TensorType.of(torch.zeros(*shape)), device=device)


def test_inferred_types_keep_the_operands_device():
    x = Value("x", _on("cuda", 2, 3))
    assert infer("aten.unsqueeze.default", (x, 0), {})[0].device == "cuda"
    scalar = Value("s", TensorType.of(torch.tensor(2.0)))       # a CPU 0-d operand is a scalar
    assert infer("aten.mul.Tensor", (scalar, x), {})[0].device == "cuda"
    assert infer("aten.mul.Tensor", (Value("y", _on("cpu", 2, 3)), 2), {})[0].device == "cpu"
    from kiln.ir.ops import _device_of          # (meta tensors cannot run a copy to a device)
    assert _device_of((x,), {"device": torch.device("cpu")}) == "cpu"      # an explicit device wins
    assert _device_of((x,), {"device": torch.device("meta")}) == "cuda"    # verify's metaized factories

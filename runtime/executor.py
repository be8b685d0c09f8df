"""CompiledGraph: runs a planned, fused graph. Steps are kernel launches (kiln.fused nodes),
ATen calls (everything else) and frees; kernel outputs that do not escape live in one arena."""
from __future__ import annotations

from typing import Any

import torch

from kiln.ir import Graph, Value, map_values
from kiln.ir.ops import run as run_aten
from kiln.passes.memory import MemoryPlan


class InputError(ValueError):
    """Inputs do not match the signature the graph was compiled for."""


class CompiledGraph:
    def __init__(self, graph: Graph, kernels: dict, check_inputs: bool = False):
        self.graph = graph
        self.kernels = kernels                      # node name (first output) -> Kernel
        self.plan: MemoryPlan = graph.meta.get("memory_plan") or MemoryPlan()
        self.check_inputs = check_inputs
        self._arena: dict[torch.device, torch.Tensor] = {}
        self._free_after = self._frees()

    def _frees(self) -> list[list[str]]:
        last: dict[str, int] = {}
        for i, n in enumerate(self.graph.nodes):
            for v in n.inputs():
                last[v.name] = i
        keep = {v.name for v in self.graph.output_values()}
        frees: list[list[str]] = [[] for _ in self.graph.nodes]
        for name, i in last.items():
            if name not in keep:
                frees[i].append(name)
        return frees

    def signature(self) -> list[str]:
        return [str(v.type) if v.type is not None else "scalar" for v in self.graph.inputs]

    def _check(self, inputs) -> None:
        if len(inputs) != len(self.graph.inputs):
            raise InputError(f"expected {len(self.graph.inputs)} inputs ({', '.join(self.signature())}), "
                             f"got {len(inputs)}")
        for i, (v, x) in enumerate(zip(self.graph.inputs, inputs)):
            t = v.type
            if t is None:
                continue
            if not isinstance(x, torch.Tensor):
                raise InputError(f"input {i}: expected a tensor {t}, got {type(x).__name__}")
            if tuple(x.shape) != t.shape or x.dtype != t.dtype:
                raise InputError(f"input {i}: expected {t}, got {str(x.dtype).removeprefix('torch.')}"
                                 f"[{','.join(map(str, x.shape))}]")

    def _arena_for(self, device: torch.device) -> torch.Tensor:
        a = self._arena.get(device)
        if a is None or a.numel() < self.plan.arena_bytes:
            a = torch.empty(self.plan.arena_bytes, dtype=torch.uint8, device=device)
            self._arena[device] = a
        return a

    def _alloc(self, v: Value, device: torch.device) -> torch.Tensor:
        t = v.type
        buf = self.plan.buffers.get(v.name)
        if buf is None or buf.offset < 0:
            return torch.empty_strided(t.shape, t.strides, dtype=t.dtype, device=device)
        raw = self._arena_for(device)[buf.offset: buf.offset + buf.nbytes]
        return raw.view(t.dtype).as_strided(t.shape, t.strides)

    def __call__(self, *inputs) -> list[Any]:
        if self.check_inputs:
            self._check(inputs)
        env: dict[str, Any] = {v.name: x for v, x in zip(self.graph.inputs, inputs)}
        for v in self.graph.constant_values:
            env[v.name] = self.graph.constants[v.name]
        device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        get = lambda v: env[v.name]  # noqa: E731
        for node, frees in zip(self.graph.nodes, self._free_after):
            if node.op == "kiln.fused":
                ins = [env[v.name] for v in node.args]
                outs = [self._alloc(v, device) for v in node.outputs]
                if outs and outs[0].numel() > 0:
                    self.kernels[node.outputs[0].name].launch(ins, outs)
                res = outs
            else:
                res = run_aten(node, map_values(node.args, get), map_values(node.kwargs, get))
                res = list(res) if isinstance(res, (tuple, list)) and len(node.outputs) != 1 else [res]
            for v, r in zip(node.outputs, res):
                env[v.name] = r
            for name in frees:
                env.pop(name, None)
        return [map_values(o, get) for o in self.graph.outputs]

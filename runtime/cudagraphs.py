"""CUDA graph replay for a compiled graph. Launch-bound graphs (small shapes, many kernels) stop
paying host time per kernel: after warm-up calls, every kernel launch and ATen call is captured
once and later calls replay it. Inputs whose address stayed the same during warm-up (weights)
are read in place; the others are copied into static buffers before each replay. A stable input
that moves forces a new capture; if capture is impossible the graph simply runs as before."""
from __future__ import annotations

import torch

MAX_CAPTURES = 4


class CudaGraphRunner:
    def __init__(self, compiled, warmup: int = 2):
        self.compiled = compiled
        self.warmup = warmup
        self.calls = 0
        self.captures = 0
        self.cg: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.key = None
        self.seen_ptrs: list[list[int | None]] = []

    def __getattr__(self, name):            # graph, plan, kernels ... come from the wrapped graph
        return getattr(self.compiled, name)

    @staticmethod
    def _ptrs(inputs):
        return [x.data_ptr() if isinstance(x, torch.Tensor) else None for x in inputs]

    def _capture(self, inputs) -> None:
        self.captures += 1
        stable = [len({p[i] for p in self.seen_ptrs}) == 1 and self.captures < MAX_CAPTURES
                  for i in range(len(inputs))]
        self.stable = stable
        self.static_in = [x if (s or not isinstance(x, torch.Tensor)) else x.clone() for x, s in zip(inputs, stable)]
        self.ptrs = self._ptrs(self.static_in)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.compiled(*self.static_in)          # warm the graph pool on the capture stream
        torch.cuda.current_stream().wait_stream(side)
        self.cg = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.cg):
            self.static_out = self.compiled(*self.static_in)

    def __call__(self, *inputs):
        if self.failed or not all(
                not isinstance(x, torch.Tensor) or x.is_cuda for x in inputs):
            return self.compiled(*inputs)
        key = tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in inputs)
        if key != self.key:
            self.key, self.cg, self.calls, self.seen_ptrs = key, None, 0, []
        self.calls += 1
        if self.cg is None and self.calls <= self.warmup:
            self.seen_ptrs.append(self._ptrs(inputs))
            return self.compiled(*inputs)
        moved = self.cg is not None and any(
            s and isinstance(x, torch.Tensor) and x.data_ptr() != p for x, s, p in zip(inputs, self.stable, self.ptrs))
        if self.cg is None or moved:
            try:
                self.seen_ptrs.append(self._ptrs(inputs))
                self._capture(inputs)
            except Exception:                  # an op that cannot be captured: run as before from now on
                self.failed, self.cg = True, None
                return self.compiled(*inputs)
        for x, s, buf in zip(inputs, self.stable, self.static_in):
            if not s and isinstance(x, torch.Tensor):
                buf.copy_(x)
        self.cg.replay()
        return [o.clone() if isinstance(o, torch.Tensor) else o for o in self.static_out]

"""Row gathers for ``kiln.gather`` nodes (aten.embedding's forward): out[n, :] = weight[index[n], :].

Target cpu: a numba kernel that copies rows as same-size integers (so bfloat16 needs no numpy
dtype) on kiln's CPU threads, after checking every index (eager raises IndexError; the check is
one pass over the indices). Targets triton and cuda: a Triton kernel (there is no CUDA C
template; a GPU runs the Triton one) that checks indices with ``tl.device_assert`` under
TRITON_DEBUG and otherwise never reads outside the weight. The weight's strides are runtime
arguments; indices are read flat (conformed to contiguous).
"""
from __future__ import annotations

import os

import torch

from kiln.ir.types import contiguous_strides
from .cache import source_path
from .kernel import Kernel
from .loader import _conform, _import, numpy_of
from .templates import ENV

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def build(node, target: str, cache_dir: str, autotune: bool = False) -> Kernel:
    gpu = target in ("triton", "cuda")
    entry = "gather_rows"
    src = ENV.get_template("gather_triton.py.j2" if gpu else "gather_numba.py.j2").render(entry=entry)
    w, idx = node.args[0], node.args[1]
    meta = {"launcher": "gather", "cache_dir": cache_dir, "rows": w.type.shape[0], "dim": w.type.shape[1],
            "n": idx.type.numel}
    return Kernel(node.attrs.get("name", "gather"), "gather", "triton" if gpu else "cpu",
                  list(node.attrs.get("ops") or ["aten.embedding.default"]), src, entry, meta)


def load(k: Kernel) -> None:
    cache_dir = k.meta.get("cache_dir") or os.path.join(os.path.expanduser("~"), ".cache", "kiln")
    d, n, v = k.meta["dim"], k.meta["n"], k.meta["rows"]
    if k.target == "cpu":
        fn = getattr(_import(source_path(cache_dir, k.source, "cpu")), k.entry)

        def launch(inputs, outputs):
            w, idx = inputs[0], inputs[1]
            bits = _BITS[w.element_size()]
            fn(numpy_of(w.view(bits)), numpy_of(idx.reshape(-1)), numpy_of(outputs[0].view(bits).view(n, d)))
        k.launcher = launch
        return
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    import triton
    fn = getattr(_import(source_path(cache_dir, k.source, "triton")), k.entry)
    block_d = min(triton.next_power_of_2(d), 1024)
    block_n = max(1, 4096 // block_d)
    grid = (max(1, -(-n // block_n)),)

    def launch(inputs, outputs):
        w, idx = inputs[0], _conform(inputs[1], contiguous_strides(tuple(inputs[1].shape)))
        fn[grid](w, idx, outputs[0], n, v, w.stride(0), w.stride(1), D=d, BLOCK_N=block_n, BLOCK_D=block_d,
                 num_warps=4)
    k.launcher = launch


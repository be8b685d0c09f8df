"""Build a Kernel for a fused node: lower, render for the target, and keep the source on disk
under its content hash so another process (or a loaded artifact) reuses it and, for numba, its
compiled machine code (numba's own cache lives next to the source file)."""
from __future__ import annotations

import hashlib
import os
import tempfile

from kiln.ir import Node
from .kernel import Kernel
from .lower import lower, memory_order


def source_path(cache_dir: str, source: str, target: str) -> str:
    h = hashlib.sha256(source.encode()).hexdigest()[:20]
    d = os.path.join(cache_dir, "kernels", target)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"k_{h}.py")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    return path


def build(node: Node, target: str, cache_dir: str, autotune: bool = False) -> Kernel:
    lk = memory_order(lower(node))
    if target == "cuda":
        from .cuda_gen import render
        target_used = "cuda"
    elif target == "triton":
        from .lower import rows_of
        from .triton_gen import render
        target_used = "triton"
        lk = rows_of(lk)
    else:
        from .numba_gen import render
        target_used = "cpu"
    kind = node.attrs["plan"]["kind"]
    src, extra = render(lk) if lk.kind == kind else render(lk, f"{kind}, laid out in rows")
    iota = {a.arg for a in lk.loads if a.iota is not None}      # computed, never read: any tensor will do
    in_strides = [None if i in iota else s for i, s in enumerate(lk.in_strides)]
    meta = {"xnumel": lk.xnumel, "rnumel": lk.rnumel, "in_strides": in_strides,
            "out_strides": lk.out_strides, "cache_dir": cache_dir, "autotune": bool(autotune), **extra}
    entry = meta.pop("entry", lk.name)      # numba sources name no kernel, so equal groups share one
    # one entry per IR node the kernel computes (repeats kept), so reports count ops, not op names
    if lk.kind != kind:
        meta["launch_kind"] = lk.kind       # laid out as another kind (lower.rows_of), launched as one
    k = Kernel(lk.name, kind, target_used, list(lk.ops), src, entry, meta)
    return k

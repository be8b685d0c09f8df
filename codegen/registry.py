"""Which code generator builds each kiln op, and which loader launches each kind of kernel.
One table each: a new kernel family (attention, matmul templates ...) adds one line here."""
from __future__ import annotations

import importlib

# node op -> "module:function" building a Kernel from (node, target, cache_dir, autotune)
BUILDERS = {
    "kiln.fused": "kiln.codegen.cache:build",
    "kiln.matmul": "kiln.codegen.matmul:build",
    "kiln.attention": "kiln.codegen.attention:build",
    "kiln.attention_bwd": "kiln.codegen.attention:build",
    "kiln.gather": "kiln.codegen.gather:build",
}

# Kernel.meta["launcher"] -> "module:function" installing kernel.launcher
LOADERS = {
    "loop": "kiln.codegen.loader:load_loop",
    "matmul": "kiln.codegen.matmul_launch:load_matmul",
    "attention": "kiln.codegen.attention:load",
    "gather": "kiln.codegen.gather:load",
}


def _resolve(spec: str):
    mod, fn = spec.split(":")
    return getattr(importlib.import_module(mod), fn)


def builder_for(op: str):
    try:
        return _resolve(BUILDERS[op])
    except KeyError:
        raise KeyError(f"no code generator for {op}; known: {', '.join(sorted(BUILDERS))}") from None


def loader_for(kind: str):
    try:
        return _resolve(LOADERS[kind])
    except KeyError:
        raise KeyError(f"no loader for kernels of launcher kind {kind!r}; known: {', '.join(sorted(LOADERS))}") from None

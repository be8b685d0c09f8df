"""kiln: a compiler toolchain for PyTorch programs (front door only: compile, backend, options,
reports, CLI). The layers live in kiln.ir, kiln.passes, kiln.codegen, kiln.runtime, kiln.autotune."""
import os as _os
import sys as _sys

import torch as _torch

# Running from a source checkout without installing: the layer folders (ir/, passes/, ...) sit
# beside kiln/, so let the package find its subpackages there too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "ir", "graph.py")) and _root not in __path__:
    __path__.append(_root)

# Without a GPU, Triton kernels run in Triton's interpreter, which must be chosen before triton
# is first imported (its standard library is decorated at import time).
if "triton" not in _sys.modules and not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from .api import compile, compile_graph, kiln_backend
from .options import Options
from .report import CompileReport, last_report


def _register_backend() -> None:
    """backend="kiln" from a source checkout too, where no entry point is installed. Where one
    is, dynamo registers it on first lookup itself (and refuses a second registration)."""
    from importlib.metadata import entry_points
    from torch._dynamo.backends import registry
    if "kiln" not in registry._COMPILER_FNS and not entry_points(group="torch_dynamo_backends", name="kiln"):
        registry.register_backend(kiln_backend, name="kiln")


_register_backend()

__version__ = "0.1.0"
__all__ = ["compile", "compile_graph", "kiln_backend", "Options", "CompileReport", "last_report"]

"""kiln: a compiler toolchain for PyTorch programs (front door only: compile, backend, options,
reports, CLI). The layers live in kiln.ir, kiln.passes, kiln.codegen, kiln.runtime, kiln.autotune."""
from .api import compile, compile_graph, kiln_backend
from .options import Options
from .report import CompileReport, last_report

__version__ = "0.1.0"
__all__ = ["compile", "compile_graph", "kiln_backend", "Options", "CompileReport", "last_report"]

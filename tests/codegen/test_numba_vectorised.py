"""The numba kernels of the CPU bench's fused patterns (bias+GELU+residual, add+RMSNorm,
softmax) vectorise: their LLVM IR holds float vector operations and calls no libm function
(a scalar exp/erf call in the row loop would keep it scalar)."""
from __future__ import annotations

import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import kiln
from kiln.api import compile_graph
from kiln.codegen.cache import source_path
from kiln.codegen.loader import _import
from kiln.ir.capture import from_fx
from kiln.ir.decompose import decomposition_table

CASES = {
    "gelu": (lambda x, b, r: F.gelu(x + b) + r, lambda: (torch.randn(64, 256), torch.randn(256), torch.randn(64, 256))),
    "rmsnorm": (lambda x, r, w: (x + r) * torch.rsqrt((x + r).pow(2).mean(-1, keepdim=True) + 1e-6) * w,
                lambda: (torch.randn(64, 256), torch.randn(64, 256), torch.randn(256))),
    "softmax": (lambda x: torch.softmax(x, -1), lambda: (torch.randn(64, 256),)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bench_patterns_vectorise(case, tmp_path):
    fn, make = CASES[case]
    args = make()
    gm = make_fx(fn, decomposition_table=decomposition_table())(*args)
    compiled, _ = compile_graph(from_fx(gm), kiln.Options(target="cpu", cache_dir=str(tmp_path)))
    torch.testing.assert_close(compiled(*args)[0], fn(*args), rtol=1e-5, atol=1e-5)
    (k,) = [k for k in compiled.kernels.values() if k.target == "cpu"]
    mod = _import(source_path(str(tmp_path), k.source, "cpu"))
    ir = "\n".join(mod._rows.inspect_llvm(sig) for sig in mod._rows.signatures)
    assert re.search(r"<(8|16) x float>", ir), f"{case}: the row loop did not vectorise"
    libm = re.findall(r"call [^\n]*@(expf?|erff?|tanhf?|logf?|log1pf?|expm1f?|llvm\.(?:exp|log)2?\.f(?:32|64))\(", ir)
    assert not libm, f"{case}: scalar libm calls {libm}"
    del sys.modules[mod.__name__]


def test_row_values_are_computed_once_a_row(tmp_path):
    """A pointwise kernel's loads and statements that do not read the innermost dim (a row
    statistic, a row's target) run before the element loop, which then vectorises."""
    fn = lambda x, s, t: (x - s) * torch.where(t > 0, s.exp() * 2, s + 1)  # noqa: E731
    args = (torch.randn(64, 256), torch.randn(64, 1), torch.randint(-2, 3, (64, 1)))
    gm = make_fx(fn, decomposition_table=decomposition_table())(*args)
    compiled, _ = compile_graph(from_fx(gm), kiln.Options(target="cpu", cache_dir=str(tmp_path)))
    torch.testing.assert_close(compiled(*args)[0], fn(*args))
    (k,) = [k for k in compiled.kernels.values() if k.target == "cpu"]
    src = open(source_path(str(tmp_path), k.source, "cpu")).read()
    body = src[src.index("def _rows("):src.index("_claim(ctr, 1)")]
    row, element = body.split("for x1 in range(")
    assert "_exp32(" in row and "_exp32(" not in element, body
    assert row.count("in1[x0]") == 1 and "in1[" not in element and "in2[" not in element, body
    mod = _import(source_path(str(tmp_path), k.source, "cpu"))
    ir = "\n".join(mod._rows.inspect_llvm(sig) for sig in mod._rows.signatures)
    assert re.search(r"<(8|16) x float>", ir), "the element loop did not vectorise"
    del sys.modules[mod.__name__]

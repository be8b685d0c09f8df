"""passes/iota.py: kernel inputs that are aranges are computed from the index, not loaded. Which
inputs the pass marks (an arange node through views, a folded arange constant, offsets; not a
float arange, not a copy), the sources (no load of a marked input; CUDA C compiles with nvcc),
and results against eager on the cpu and triton targets, cross-entropy's backward included."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.api import captured_graphs, compile_graph
from kiln.options import Options

TARGETS = ["cpu", "triton"]


def _compiled(fn, args, kind="inference", target="cpu"):
    """The compiled graphs of ``fn`` (the last of ``kind``): kernels and the graph after passes."""
    def run(be):
        f = torch.compile(fn, backend=be)
        if kind == "inference":
            with torch.no_grad():
                f(*args)
        else:
            out = f(*args)
            torch.autograd.grad(out, [a for a in args if a.requires_grad])
    graphs = [g for k, g in captured_graphs(run) if k == kind]
    g = graphs[-1]
    g.meta["graph_kind"] = kind
    return compile_graph(g, Options(target=target), kind)[0]


def _marked(cg) -> list[list[int]]:
    return [n.attrs.get("iota", []) for n in cg.graph.nodes if n.op == "kiln.fused"]


def one_hot_sum(x, t):
    """A row's value at its target column, written as a one-hot reduction."""
    cols = torch.arange(x.shape[1], device=x.device)
    return torch.where(cols == t[:, None], x, 0).sum(1)


def positions(x):
    return x + torch.arange(x.shape[-1], device=x.device)


def offset_rows(x):
    """A sliced, reshaped, expanded arange: element (i, j) of the view is 7 + j."""
    return x * torch.arange(x.shape[-1] + 9, device=x.device)[7:7 + x.shape[-1]].view(1, -1).expand_as(x)


def int32_mask(x, lens):
    """A padding mask from int32 positions and each row's length."""
    i = torch.arange(x.shape[-1], dtype=torch.int32, device=x.device)
    return torch.where(i[None, :] < lens[:, None], x, -1.0).amax(-1)


CASES = [(one_hot_sum, lambda: (torch.randn(6, 20000), torch.randint(0, 20000, (6,)))),   # an arange node
         (one_hot_sum, lambda: (torch.randn(6, 40), torch.randint(0, 40, (6,)))),          # a folded constant
         (positions, lambda: (torch.randn(3, 50),)),
         (positions, lambda: (torch.randn(3, 9000),)),
         (offset_rows, lambda: (torch.randn(4, 30),)),
         (offset_rows, lambda: (torch.randn(4, 9000),)),
         (int32_mask, lambda: (torch.randn(16, 64), torch.randint(1, 64, (16,), dtype=torch.int32)))]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_arange_inputs_are_computed_and_match_eager(case, target):
    fn, make = CASES[case]
    torch.manual_seed(case)
    args = make()
    cg = _compiled(fn, args, target=target)
    assert any(_marked(cg)), str(cg.graph)
    for n in cg.graph.nodes:                 # a marked input is never read from memory
        for pos, _ in n.attrs.get("iota", []):
            src = cg.kernels[n.outputs[0].name].source
            assert f"tl.load(in_ptr{pos} " not in src and f"in{pos}[" not in src, src
    torch._dynamo.reset()
    with torch.no_grad():
        got = kiln.compile(fn, target=target)(*args)
    torch.testing.assert_close(got, fn(*args))


def test_what_is_not_an_arange_is_loaded():
    """A float arange (its values round past 2**24), a step other than 1, and an index tensor that
    only looks like one at compile time (an input) stay loads."""
    for fn in (lambda x: x + torch.arange(x.shape[-1], dtype=torch.float32),
               lambda x: x + torch.arange(0, 2 * x.shape[-1], 2),
               lambda x: x + torch.arange(1, x.shape[-1] + 1)):
        assert not any(_marked(_compiled(fn, (torch.randn(2, 9000),))))
    assert not any(_marked(_compiled(lambda x, i: x + i, (torch.randn(2, 50), torch.arange(50)))))


@pytest.mark.parametrize("target", TARGETS)
def test_an_arange_used_elsewhere_is_still_made(target):
    """Only an arange every reader computes is skipped: one the graph returns, or that an op
    other than a kernel reads, is made as before."""
    fn = lambda x: (x + torch.arange(x.shape[-1]), torch.arange(x.shape[-1]))  # noqa: E731
    x = torch.randn(3, 9000)
    cg = _compiled(fn, (x,), target=target)
    from kiln.runtime.executor import SKIP
    assert any(_marked(cg)) and not any(st[0] is SKIP for st in cg._steps)
    for got, want in zip(cg(x), fn(x)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cross_entropy_backward_computes_its_column_indices(dtype):
    torch.manual_seed(0)
    x = (torch.randn(8, 1000) * 4).to(dtype).requires_grad_()
    t = torch.randint(0, 1000, (8,))
    cg = _compiled(lambda x, t: F.cross_entropy(x, t), (x, t), kind="backward")
    assert any(_marked(cg)), str(cg.graph)
    # the arange is not made at all (its kernel gets a placeholder): no ATen step left makes one
    from kiln.runtime.executor import ATEN, SKIP
    assert any(st[0] is SKIP for st in cg._steps)
    assert not any(st[0] is ATEN and "arange" in st[1][0].op for st in cg._steps), str(cg.graph)
    for target in TARGETS:
        torch._dynamo.reset()
        got = torch.autograd.grad(kiln.compile(lambda x, t: F.cross_entropy(x, t), target=target)(x, t), x)[0]
        want = torch.autograd.grad(F.cross_entropy(x, t), x)[0]
        tol = (1e-5, 1e-7) if dtype == torch.float32 else (3e-2, 1e-3)  # bf16: eager rounds every step
        torch.testing.assert_close(got.float(), want.float(), rtol=tol[0], atol=tol[1])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_with_arange_inputs_compile(tmp_path):
    from kiln.codegen.cuda_gen import render
    from kiln.codegen.lower import lower
    for fn, make in CASES:
        for n in _compiled(fn, make(), target="cuda").graph.nodes:
            if n.op != "kiln.fused" or not n.attrs.get("iota"):
                continue
            src, _ = render(lower(n))
            assert "in{}[".format(n.attrs["iota"][0][0]) not in src
            p = tmp_path / f"{n.attrs['name']}.cu"
            p.write_text(src)
            r = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-c", str(p), "-o", os.devnull],
                               capture_output=True, text=True)
            assert r.returncode == 0, f"{p}:\n{r.stderr[:2000]}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("target", ["triton", "cuda"])
def test_arange_inputs_on_the_gpu(target):
    for i, (fn, make) in enumerate(CASES):
        torch.manual_seed(i)
        args = [a.cuda() for a in make()]
        torch._dynamo.reset()
        with torch.no_grad():
            got = kiln.compile(fn, target=target)(*args)
        torch.testing.assert_close(got, fn(*args), msg=lambda m: f"{fn.__name__}: {m}")

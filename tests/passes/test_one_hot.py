"""A scatter of one value a row into zeros, in a backward graph, becomes a one-hot comparison
(passes/one_hot.py): a cross-entropy's backward runs as one kernel with no scatter. Results of
training steps against eager (cross-entropy variants, max along a dim, whose backward scatters a
tensor), and forward graphs left alone."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import kiln

N, V = 16, 300


def _grads(fn, target, report=None):
    torch.manual_seed(0)
    x0, t = torch.randn(N, V), torch.randint(0, V, (N,))
    t[3] = -100
    out = []
    for f in (kiln.compile(fn, target=target, **({"report": report} if report else {})), fn):
        torch._dynamo.reset()
        x = x0.clone().requires_grad_()
        loss = f(x, t)
        loss.backward()
        out.append((loss.detach(), x.grad))
    return out


CASES = {
    "mean": lambda x, t: F.cross_entropy(x, t),
    "sum": lambda x, t: F.cross_entropy(x, t, reduction="sum"),
    "weights": lambda x, t: F.cross_entropy(x, t, weight=torch.linspace(0.5, 2.0, V)),
    "smoothing": lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1),
    "nll": lambda x, t: F.nll_loss(torch.log_softmax(x * 0.5, -1), t),
    # the backward of max along a dim scatters the incoming gradient (a tensor) into zeros
    "max_dim": lambda x, t: (torch.max(x, 1).values * torch.arange(N)).sum(),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("target", ["cpu", "triton"])
def test_training_steps_match_eager(case, target):
    (loss, grad), (want_loss, want_grad) = _grads(CASES[case], target)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_cross_entropy_backward_is_one_kernel_without_a_scatter(tmp_path):
    report = tmp_path / "report.jsonl"
    _grads(CASES["mean"], "cpu", str(report))
    graphs = [json.loads(line) for line in report.read_text().splitlines()]
    (bwd,) = [g for g in graphs if g["graph_kind"] == "backward"]
    ops = [op for k in bwd["kernels"] for op in k["ops"]]
    assert "aten.scatter.value" not in ops and "aten.eq.Tensor" in ops
    assert sum(k["target"] == "cpu" for k in bwd["kernels"]) == 1, bwd["kernels"]


@pytest.mark.parametrize("target", ["cpu", "triton"])
def test_cross_entropy_backward_is_pointwise(tmp_path, target):
    """The row sum of log-softmax's backward is the picked gradient (no reduction over the row),
    so the gradient is one pointwise walk over the logits."""
    report = tmp_path / "report.jsonl"
    _grads(CASES["mean"], target, str(report))
    graphs = [json.loads(line) for line in report.read_text().splitlines()]
    (bwd,) = [g for g in graphs if g["graph_kind"] == "backward"]
    ops = [op for k in bwd["kernels"] for op in k["ops"]]
    assert "aten.sum.dim_IntList" not in ops, bwd["kernels"]
    assert all(k["kind"] != "reduction" for k in bwd["kernels"]), bwd["kernels"]


SUMS = """graph(%idx: int64[4,1], %src: float32[4,1], %x: float32[4,1], %y: float32[], %w: float32[4,6]) {
  %z: float32[4,6] = aten.zeros.default([4, 6], dtype=torch.float32, device=device("cpu"))
  %s: float32[4,6] = aten.scatter.src(%z, 1, %idx, %src)
  %m: float32[4,6] = aten.mul.Tensor(%x, %s)
  %n: float32[4,6] = aten.neg.default(%m)
  %d: float32[4,6] = aten.div.Tensor(%n, %y)
  %c: float64[4,6] = aten._to_copy.default(%d, dtype=torch.float64)
  %r: float64[4] = aten.sum.dim_IntList(%c, [-1])
  %q: float32[4,1] = aten.sum.dim_IntList(%d, [1], True)
  %full: float32[4,6] = aten.mul.Tensor(%s, %w)
  %k: float32[4,1] = aten.sum.dim_IntList(%full, [1], True)
  return (%r, %q, %k)
}"""


@pytest.mark.parametrize("y", [3.0, 0.0, float("nan")])
def test_sums_of_a_one_hot_match_the_graph_they_replace(y):
    """Sums along the scattered dim through casts, negation, products and quotients by tensors
    constant along it become the picked value's chain (a sum over a product with a tensor that
    varies along it stays); non-finite factors give eager's NaN, which the zeros' terms carry."""
    from kiln.ir.text import parse_graph
    from kiln.passes.one_hot import one_hot_scatter
    from kiln.runtime.executor import CompiledGraph
    g = parse_graph(SUMS)
    g.meta["graph_kind"] = "backward"
    h = one_hot_scatter(g)
    assert [n.outputs[0].name for n in h.nodes if n.op == "aten.sum.dim_IntList"] == ["k"]
    torch.manual_seed(0)
    x = torch.randn(4, 1)
    x[1], x[2] = float("inf"), float("nan")
    inputs = [torch.tensor([[5], [0], [2], [3]]), torch.randn(4, 1), x, torch.tensor(y), torch.randn(4, 6)]
    for got, want in zip(CompiledGraph(h, {})(*inputs), CompiledGraph(g, {})(*inputs)):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


def test_forward_scatters_are_left_alone():
    """An index out of range must still fail in a forward (the comparison would give zeros)."""
    fn = lambda x, i: torch.zeros_like(x).scatter(1, i, 2.0) + x  # noqa: E731
    x, i = torch.randn(N, V), torch.randint(0, V, (N, 1))
    torch._dynamo.reset()
    torch.testing.assert_close(kiln.compile(fn, target="cpu")(x, i), fn(x, i))
    i[2] = V
    torch._dynamo.reset()
    with pytest.raises((RuntimeError, IndexError)):
        kiln.compile(fn, target="cpu")(x, i)


@pytest.mark.parametrize("cols", [300, 9000])     # one block a row; rows walked in blocks
def test_cross_entropy_gradient_runs_in_rows_on_triton(cols, tmp_path):
    """The gradient's Triton kernel is laid out in rows (codegen/lower.rows_of): the row's target,
    scale and checks once a row, the row's columns in one block or walked in blocks."""
    torch.manual_seed(0)
    x0, t = torch.randn(6, cols), torch.randint(0, cols, (6,))
    t[2] = -100
    torch._dynamo.reset()
    f = kiln.compile(lambda x, t: F.cross_entropy(x, t), target="triton", cache_dir=str(tmp_path),
                     report=str(tmp_path / "report.jsonl"))
    x = x0.clone().requires_grad_()
    (got,) = torch.autograd.grad(f(x, t), x)
    x = x0.clone().requires_grad_()
    (want,) = torch.autograd.grad(F.cross_entropy(x, t), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    srcs = [p.read_text() for p in tmp_path.rglob("k_*.py")]
    (grad_src,) = [s for s in srcs if "_pointwise_" in s.splitlines()[0]]
    assert "tl.arange(0, RBLOCK)[None, :]" in grad_src
    assert ("for r_start in range(0, RN, RBLOCK):" in grad_src) == (cols > 8192)

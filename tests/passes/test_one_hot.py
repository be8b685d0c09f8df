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

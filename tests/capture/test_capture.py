"""Capture: new input shapes recompile (Dynamo guards, symbolic graphs specialised per shape),
training graphs compile forward and backward, export capture binds weights as constants."""
import torch

import kiln
from kiln.ir.capture import capture_export


def test_new_shapes_recompile_and_match():
    torch._dynamo.reset()
    f = lambda x, w: torch.softmax(x * w, -1) + x.mean()  # noqa: E731
    cf = torch.compile(f, backend="kiln", options={"target": "cpu"})
    for shape in [(4, 8), (6, 8), (9, 8), (5, 3), (0, 3)]:
        x, w = torch.randn(shape), torch.randn(shape[-1])
        torch.testing.assert_close(cf(x, w), f(x, w))


def test_kiln_compile_specialises_symbolic_graphs_up_to_a_limit(monkeypatch, caplog):
    """kiln.compile leaves Dynamo's automatic dynamic shapes on: the second shape arrives as a
    symbolic graph that kiln compiles per concrete shape, keyed on the symbolic inputs only; past
    the limit a new shape runs the ATen graph uncompiled (with one warning) and still matches."""
    from kiln import api
    torch._dynamo.reset()
    monkeypatch.setattr(api._ShapeSpecialized, "LIMIT", 2)
    f = lambda x, w: torch.softmax(x * w, -1) + x.mean()  # noqa: E731
    w = torch.randn(8)
    cf = kiln.compile(f, target="cpu")
    stats = torch._dynamo.utils.counters["stats"]
    before = stats["unique_graphs"]
    with caplog.at_level("WARNING", logger="kiln"):
        for n in (4, 6, 9, 11, 6, 13):
            x = torch.randn(n, 8)
            torch.testing.assert_close(cf(x, w), f(x, w))
    spec = [r for r in caplog.records if "input signatures" in r.getMessage()]
    assert len(spec) == 1
    assert stats["unique_graphs"] - before == 2     # one static graph, one symbolic: no recompile per shape


def test_training_compiles_forward_and_backward(tmp_path):
    """Gradients against a float64 reference: the LayerNorm backward cancels terms ~1e3x larger
    than the result, so eager fp32 itself is off by ~5e-6; kiln may differ by its own rounding."""
    import copy
    torch._dynamo.reset()
    report = tmp_path / "r.jsonl"
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16))
    m64 = copy.deepcopy(m).double()
    x = torch.randn(4, 8)
    cm = torch.compile(m, backend="kiln", options={"target": "cpu", "report": str(report)})
    cm(x).pow(2).sum().backward()
    got = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m(x).pow(2).sum().backward()
    m64(x.double()).pow(2).sum().backward()
    for a, b, r in zip(got, [p.grad for p in m.parameters()], [p.grad for p in m64.parameters()]):
        eager_err = (b.double() - r).abs().max().item()
        assert (a.double() - r).abs().max().item() <= 4 * eager_err + 2e-6
    import json
    kinds = [json.loads(line)["graph_kind"] for line in report.read_text().splitlines()]
    assert kinds == ["forward", "backward"]


def test_export_capture_binds_weights():
    m = torch.nn.Linear(4, 3).eval()
    g = capture_export(m, (torch.randn(2, 4),))
    assert len(g.inputs) == 1
    assert {tuple(t.shape) for t in g.constants.values()} >= {(3, 4), (3,)}
    compiled, _ = kiln.compile_graph(g, kiln.Options(target="cpu"))
    x = torch.randn(2, 4)
    torch.testing.assert_close(compiled(x)[0], m(x))


def test_export_keeps_variance_reductions_fusable():
    """torch.export keeps var_mean.dim / var.dim / std.dim (tracing would turn them into
    .correction): they still decompose, so layer norm is one kernel on the AOT path too, and
    unbiased= means what it does in eager."""
    from kiln.aot import compile_ahead

    class M(torch.nn.Module):
        def forward(self, x, w, b):
            return (torch.nn.functional.layer_norm(x, (16,), w, b), *torch.var_mean(x, 1, unbiased=False),
                    torch.var(x, [0], unbiased=True, keepdim=True), torch.std(x, 1, True))

    torch.manual_seed(0)
    args = (torch.randn(8, 16), torch.randn(16), torch.randn(16))
    compiled, report = compile_ahead(M(), args, {"target": "cpu"})
    for got, want in zip(compiled(*args), M()(*args)):
        torch.testing.assert_close(got, want)
    assert not any(op.startswith(("aten.var", "aten.std")) for op in report.fallback_ops), report.fallback_ops

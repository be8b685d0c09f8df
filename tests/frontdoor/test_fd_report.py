"""Compile reports (keys fixed by DESIGN.md), the JSON-lines report option, kiln.last_report()
and the torch.compile backend registered through the entry point."""
import json
from importlib.metadata import entry_points

import pytest
import torch
import torch._dynamo

import kiln

from .factories import make

KERNEL_KINDS = {"pointwise", "reduction", "matmul", "attention", "extern"}
KERNEL_TARGETS = {"triton", "cuda", "cpu", "aten"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def check_report_dict(d: dict):
    for key in ("graph_nodes", "kernels", "fallback_ops", "memory", "passes", "compile_s"):
        assert key in d, key
    assert isinstance(d["graph_nodes"], int) and d["graph_nodes"] > 0
    assert isinstance(d["kernels"], list) and d["kernels"]
    for k in d["kernels"]:
        assert set(k) == {"name", "kind", "target", "ops"}, k
        assert isinstance(k["name"], str)
        assert k["kind"] in KERNEL_KINDS, k
        assert k["target"] in KERNEL_TARGETS, k
        assert isinstance(k["ops"], list) and k["ops"] and all(isinstance(o, str) for o in k["ops"])
    assert isinstance(d["fallback_ops"], list) and all(isinstance(o, str) for o in d["fallback_ops"])
    mem = d["memory"]
    assert set(mem) >= {"peak_bytes", "arena_bytes", "per_tier", "transfers_bytes"}
    assert isinstance(mem["peak_bytes"], int) and isinstance(mem["arena_bytes"], int)
    assert isinstance(mem["per_tier"], dict) and all(isinstance(v, int) for v in mem["per_tier"].values())
    assert isinstance(mem["transfers_bytes"], int)
    assert d["passes"] and all(set(p) == {"name", "ms"} for p in d["passes"])
    assert all(isinstance(p["name"], str) and p["ms"] >= 0 for p in d["passes"])
    assert isinstance(d["compile_s"], float) and d["compile_s"] >= 0
    json.dumps(d, allow_nan=False)


def test_kiln_compile_report_and_last_report(tmp_path):
    model, inputs = make()
    path = tmp_path / "sub" / "report.jsonl"
    with torch.no_grad():
        compiled = kiln.compile(model, inputs, target="cpu", report=str(path))
        rep = kiln.last_report()
        got = compiled(*inputs)
        want = model(*inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert isinstance(rep, kiln.CompileReport)
    d = rep.to_dict()
    check_report_dict(d)
    assert all(k["target"] in ("cpu", "aten") for k in d["kernels"])
    # every op the graph runs is accounted for by some kernel entry; fallbacks are listed there too
    ops_in_kernels = {o for k in d["kernels"] for o in k["ops"]}
    assert set(d["fallback_ops"]) <= ops_in_kernels
    assert isinstance(rep.summary(), str) and rep.summary()
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == json.loads(json.dumps(d))


def test_report_appends_forward_and_backward(tmp_path):
    path = tmp_path / "train.jsonl"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    compiled = torch.compile(model, backend="kiln", options={"target": "cpu", "report": str(path)})
    loss = compiled(x).square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().mean().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    lines = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert len(lines) == 2
    for d in lines:
        check_report_dict(d)
    assert [d.get("graph_kind") for d in lines] == ["forward", "backward"]
    assert kiln.last_report().to_dict() == lines[1]


def test_backend_entry_point_registered():
    eps = entry_points(group="torch_dynamo_backends")
    assert any(ep.name == "kiln" and ep.value == "kiln.api:kiln_backend" for ep in eps)


def test_torch_compile_backend_by_name(tmp_path):
    model, inputs = make()
    path = tmp_path / "r.jsonl"
    compiled = torch.compile(model, backend="kiln", options={"target": "cpu", "report": str(path)})
    with torch.no_grad():
        got = compiled(*inputs)
        want = model(*inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["graph_kind"] == "inference"


def test_backend_rejects_bad_option():
    model, inputs = make()
    compiled = torch.compile(model, backend="kiln", options={"target": "tpu"})
    with pytest.raises(Exception, match="target"):
        with torch.no_grad():
            compiled(*inputs)

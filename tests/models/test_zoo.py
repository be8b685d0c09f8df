"""End-to-end correctness of the model zoo on both targets (cpu: numba; triton: the interpreter
without a GPU): inference under no_grad, one forward+backward against eager's gradients, and a
few optimizer steps against eager's parameters."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import kiln
from .zoo import CUSTOM_OP, ZOO, build, device_for

TARGETS = ["cpu", "triton"]
RTOL, ATOL = 1e-4, 1e-5


def close(a, b, rtol=RTOL, atol=ATOL, what=""):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def reports(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def check_reports(name, reps):
    assert reps, "no graph was compiled"
    generated = [k for r in reps for k in r["kernels"] if k["target"] != "aten"]
    assert generated, f"{name}: kiln generated no kernel"
    fallbacks = {op for r in reps for op in r["fallback_ops"]}
    if name == "custom_op":
        assert CUSTOM_OP in fallbacks
        aten = [k for r in reps for k in r["kernels"] if k["target"] == "aten"]
        assert any(CUSTOM_OP in k["ops"] for k in aten)
    if name == "cnn":
        convs = [k for r in reps for k in r["kernels"] if "aten.convolution.default" in k["ops"]]
        assert convs and all(k["target"] == "aten" for k in convs)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(ZOO))
def test_inference(name, target, tmp_path):
    torch._dynamo.reset()
    model, inputs = build(name, device=device_for(target))
    model.eval()
    rep = tmp_path / "report.jsonl"
    compiled = kiln.compile(copy.deepcopy(model), target=target, report=str(rep))
    with torch.no_grad():
        want = model(*inputs)
        got = compiled(*inputs)
        got2 = compiled(*inputs)          # second call: cached graph, reused arena
    close(got, want, what=name)
    close(got2, want, what=f"{name} (second call)")
    reps = reports(rep)
    assert all(r["graph_kind"] == "inference" for r in reps)
    assert all(r["target"] == target for r in reps)
    check_reports(name, reps)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(ZOO))
def test_training_step(name, target, tmp_path):
    """One forward + backward in train mode: outputs, parameter and input gradients, and
    (batchnorm) running statistics match eager."""
    torch._dynamo.reset()
    model, inputs = build(name, device=device_for(target))
    model.train()
    ref = copy.deepcopy(model)
    rep = tmp_path / "report.jsonl"
    compiled = torch.compile(model, backend="kiln", options={"target": target, "report": str(rep)})
    float_in = [x.is_floating_point() for x in inputs]
    xs_ref = [x.clone().requires_grad_(f) for x, f in zip(inputs, float_in)]
    xs = [x.clone().requires_grad_(f) for x, f in zip(inputs, float_in)]
    want, got = ref(*xs_ref), compiled(*xs)
    close(got, want, what=f"{name} forward")
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    for (pn, p), q in zip(model.named_parameters(), ref.parameters()):
        close(p.grad, q.grad, rtol=1e-3, atol=1e-4, what=f"{name} grad of {pn}")
    for i, (x, y) in enumerate(zip(xs, xs_ref)):
        if y.grad is not None:
            close(x.grad, y.grad, rtol=1e-3, atol=1e-4, what=f"{name} grad of input {i}")
    for (bn, b), c in zip(model.named_buffers(), ref.buffers()):
        close(b, c, what=f"{name} buffer {bn}")
    reps = reports(rep)
    kinds = {r["graph_kind"] for r in reps}
    assert {"forward", "backward"} <= kinds, kinds
    check_reports(name, reps)


# Adam only on models without parameters whose gradient is zero up to rounding (the key bias
# under softmax is one): Adam normalises that noise into steps of about lr in either direction.
@pytest.mark.parametrize("target,opt,name", [
    ("cpu", "sgd", "block"), ("cpu", "adam", "mlp"), ("cpu", "adam", "cnn"),
    ("triton", "sgd", "block"), ("triton", "adam", "mlp"),
])
def test_training_loop(target, opt, name):
    """N optimizer steps with a compiled model reach the same parameters as eager."""
    torch._dynamo.reset()
    model, inputs = build(name, device=device_for(target))
    model.train()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="kiln", options={"target": target})
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
            "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2)}[opt]
    o_ref, o = make(ref.parameters()), make(model.parameters())
    batches = [build(name, seed=10 + i, device=device_for(target))[1] for i in range(4)]
    for xs in batches:
        for m, optim in ((ref, o_ref), (compiled, o)):
            optim.zero_grad()
            out = m(*xs)
            loss = (out.float() ** 2).mean()
            loss.backward()
            optim.step()
    for (pn, p), q in zip(model.named_parameters(), ref.parameters()):
        close(p, q, rtol=1e-3, atol=1e-4, what=f"{name}/{opt} param {pn} after {len(batches)} steps")
    for (bn, b), c in zip(model.named_buffers(), ref.buffers()):
        close(b, c, rtol=1e-3, atol=1e-4, what=f"{name}/{opt} buffer {bn}")

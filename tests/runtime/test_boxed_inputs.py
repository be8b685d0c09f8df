"""AOTAutograd's boxed calling convention: a compiled graph takes ownership of its argument list,
so an input nobody else holds (a backward's saved activation) can be freed inside the graph."""
import gc
import weakref

import torch

import kiln
from kiln.ir.capture import boxed, capture_export


class Chain(torch.nn.Module):
    def forward(self, x, y):
        return (x * 2).sum() + torch.tanh(y).sum()


def _compiled():
    args = (torch.randn(32, 32), torch.randn(32, 32))
    compiled, _ = kiln.compile_graph(capture_export(Chain(), args), kiln.Options.make({"target": "cpu"}), "inference")
    return compiled


def test_boxed_call_empties_the_list_and_keeps_no_input_alive():
    fn = boxed(_compiled())
    x, y = torch.randn(32, 32), torch.randn(32, 32)
    want = Chain()(x, y)
    gone = weakref.ref(x)
    args = [x, y]
    del x
    out = fn(args)
    assert args == []
    gc.collect()
    assert gone() is None               # the graph dropped it at its last use, the list was cleared
    torch.testing.assert_close(out[0], want)


def test_boxed_training_step_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    x = torch.randn(8, 16)
    model(x).square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.compile(model, backend=lambda gm, ex: kiln.kiln_backend(gm, ex, options={"target": "cpu"}))(x) \
        .square().sum().backward()
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)



def test_boxed_per_shape_graphs(monkeypatch):
    """A second input shape makes Dynamo hand over symbolic graphs, compiled per concrete shape
    (api._ShapeSpecialized): the backward's saved activations reach that graph through the boxed
    convention too (the list emptied), and the gradients match eager's."""
    from kiln import api
    emptied = []
    run = api._ShapeSpecialized.run_list

    def spy(self, args):
        out = run(self, args)
        emptied.append((self.kind, args == []))
        return out
    monkeypatch.setattr(api._ShapeSpecialized, "run_list", spy)
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    f = torch.compile(model, backend=lambda gm, ex: kiln.kiln_backend(gm, ex, options={"target": "cpu"}))
    for rows in (8, 12, 20):
        x = torch.randn(rows, 16)
        model.zero_grad()
        f(x).square().sum().backward()
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(x).square().sum().backward()
        for g, p in zip(got, model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
    assert ("backward", True) in emptied and all(ok for _, ok in emptied), emptied

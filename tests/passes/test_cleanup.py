"""Constant folding: tensor factories fold, folding happens on real tensors even under an active
FakeTensorMode, and graph outputs are never folded into shared constants."""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kiln.ir import Graph, Node, TensorType, Value
from kiln.passes.cleanup import constant_fold


def tt(shape, dtype=torch.float32):
    return TensorType.of(torch.empty(shape, dtype=dtype))


def _factory_graph():
    x = Value("x", tt([8]))
    ar, mask, y = Value("ar", tt([8], torch.int64)), Value("mask", tt([8], torch.bool)), Value("y", tt([8]))
    full = Value("full", tt([8]))
    return Graph(inputs=[x], nodes=[
        Node("aten.arange.start_step", (0, 8), {"layout": torch.strided, "device": torch.device("cpu"),
                                                "pin_memory": False}, [ar]),
        Node("aten.lt.Scalar", (ar, 4), {}, [mask]),
        Node("aten.full.default", ([8], 2.0), {"dtype": torch.float32, "layout": torch.strided,
                                               "device": torch.device("cpu"), "pin_memory": False}, [full]),
        Node("aten.where.self", (mask, x, full), {}, [y])], outputs=[y])


def test_factories_and_their_users_fold():
    g = constant_fold(_factory_graph())
    assert [n.op for n in g.nodes] == ["aten.where.self"]
    assert torch.equal(g.constants["mask"], torch.arange(8) < 4)
    assert torch.equal(g.constants["full"], torch.full([8], 2.0))


def test_folds_real_tensors_under_fake_mode():
    """AOTAutograd calls kiln's compilers while a FakeTensorMode is active."""
    with FakeTensorMode():
        g = constant_fold(_factory_graph())
    assert all(type(t) is torch.Tensor for t in g.constants.values())
    assert torch.equal(g.constants["mask"], torch.arange(8) < 4)


def test_graph_outputs_are_not_folded():
    """Eager returns a fresh tensor per call; a folded output would be one shared tensor."""
    g = _factory_graph()
    g.outputs = [g.nodes[-1].out, g.nodes[2].out]
    g2 = constant_fold(g)
    assert "aten.full.default" in [n.op for n in g2.nodes]
    assert "full" not in g2.constants


def test_large_fills_are_not_held_as_constants():
    """A folded value is held by the compiled graph for good (eager makes it per call): uniform
    fills fold only within one allocator block; a larger zero buffer runs each call."""
    from kiln.passes.cleanup import FILL_MAX_BYTES
    n = FILL_MAX_BYTES // 4 + 1
    x, z, y = Value("x", tt([n])), Value("z", tt([n])), Value("y", tt([n]))
    g = Graph(inputs=[x], nodes=[
        Node("aten.zeros.default", ([n],), {"dtype": torch.float32, "device": torch.device("cpu")}, [z]),
        Node("aten.add.Tensor", (x, z), {}, [y])], outputs=[y])
    g2 = constant_fold(g)
    assert "z" not in g2.constants and [nd.op for nd in g2.nodes] == ["aten.zeros.default", "aten.add.Tensor"]


def test_each_kernel_reader_of_a_fill_gets_its_own():
    """A zero fill read by two pointwise ops: each reader gets its own copy, so fusion makes the
    fill inside each kernel instead of storing it from the first and holding it for the second;
    an ATen reader (here index_put) keeps the original."""
    from kiln.passes.cleanup import split_fills
    x, z, a, b, c = (Value(n, tt([64])) for n in ("x", "z", "a", "b", "c"))
    i, p = Value("i", tt([4], torch.int64)), Value("p", tt([64]))
    g = Graph(inputs=[x, i], nodes=[
        Node("aten.zeros.default", ([64],), {"dtype": torch.float32}, [z]),
        Node("aten.add.Tensor", (x, z), {}, [a]),
        Node("aten.exp.default", (a,), {}, [b]),
        Node("aten.mul.Tensor", (b, z), {}, [c]),
        Node("aten.index_put.default", (z, [i], c), {}, [p])], outputs=[p])
    g2 = split_fills(g)
    ops = [n.op for n in g2.nodes]
    assert ops == ["aten.zeros.default", "aten.zeros.default", "aten.add.Tensor", "aten.exp.default",
                   "aten.zeros.default", "aten.mul.Tensor", "aten.index_put.default"]
    readers = {n.op: [v.name for v in n.inputs()] for n in g2.nodes}
    assert readers["aten.index_put.default"][0] == "z" and "z" not in readers["aten.add.Tensor"]

"""verify: accepts what capture and a fusion pass produce, and names the node and the problem
for each kind of breakage a pass can introduce."""
import pytest
import torch

from kiln.ir import Graph, Node, Value, VerifyError, parse_graph, print_graph, verify
from kiln.ir.serialize import loads, dumps


def _by_name(g, name):
    return next(n for n in g.nodes if any(v.name == name for v in n.outputs))


def test_valid_graphs_pass(block_graph, fused, helpers):
    verify(block_graph)
    verify(fused)
    verify(parse_graph(print_graph(fused), fused.constants))
    verify(loads(dumps(fused), fused.constants))
    assert issubclass(VerifyError, ValueError)


def test_captured_with_weights_as_constants(helpers):
    inputs = helpers.block_inputs()
    g = helpers.capture(helpers.block, *inputs, constants={"w_1": inputs[1], "b_1": inputs[2]})
    assert [v.name for v in g.constant_values] == ["w_1", "b_1"]
    verify(g)
    verify(loads(dumps(g), g.constants))
    g.constants["w_1"] = inputs[1].t()                             # same shape, other strides
    with pytest.raises(VerifyError, match=r"constant %w_1 is declared float32\[16,16\] but its tensor is float32\[16,16\]\{1,16\}"):
        verify(g)


def test_use_before_def(block_graph):
    g = block_graph
    g.nodes[0], g.nodes[1] = g.nodes[1], g.nodes[0]
    with pytest.raises(VerifyError, match=r"node 0 \(%sub = aten.sub.Tensor\): argument %mean is not defined before use"):
        verify(g)


def test_duplicate_definition(block_graph):
    g = block_graph
    _by_name(g, "sub_1").outputs[0].name = "sub"
    with pytest.raises(VerifyError, match=r"\(%sub = aten.sub.Tensor\): %sub is defined twice"):
        verify(g)
    g2 = Graph(inputs=[Value("a", None), Value("a", None)])
    with pytest.raises(VerifyError, match="input %a is defined twice"):
        verify(g2)


def test_wrong_declared_shape_and_dtype(block_graph, helpers):
    g = block_graph
    mm = _by_name(g, "mm").outputs[0]
    mm.type = helpers.tt([8, 8])
    with pytest.raises(VerifyError, match=r"%mm is declared float32\[8,8\] but aten.mm.default gives float32\[8,16\]"):
        verify(g, "after fuse")
    mm.type = helpers.tt([8, 16])
    verify(g)
    cast = _by_name(g, "_to_copy").outputs[0]
    cast.type = cast.type.with_(dtype=torch.float16)
    with pytest.raises(VerifyError, match=r"%_to_copy is declared float16\[2,4,16\] but .* gives bfloat16"):
        verify(g)


def test_stale_use_type_and_output_count(helpers):
    tt = helpers.tt
    x = Value("x", tt([3, 5]))
    var, mean = Value("var", tt([3])), Value("mean", tt([3]))
    ok = Graph(inputs=[x], nodes=[Node("aten.var_mean.correction", (x, [1]), {"correction": 1}, [var, mean])],
               outputs=[var, mean])
    verify(ok)
    ok.nodes[0].outputs = [var]
    with pytest.raises(VerifyError, match="op returns 2 outputs but 1 are declared"):
        verify(ok)
    stale = Graph(inputs=[x], nodes=[], outputs=[Value("x", tt([5, 3]))])
    with pytest.raises(VerifyError, match=r"graph output %x has type float32\[5,3\] but was defined as float32\[3,5\]"):
        verify(stale)


def test_undefined_output(fused, helpers):
    fused.outputs.append(Value("ghost", helpers.tt([1])))
    with pytest.raises(VerifyError, match="graph output %ghost is not defined before use"):
        verify(fused, "cse")


def test_fused_arity_and_type_mismatch(fused, helpers):
    node = fused.nodes[2]
    node.args = node.args[:1]
    with pytest.raises(VerifyError, match=r"\(%y = kiln.fused\): 1 arguments but the body takes 2 inputs"):
        verify(fused)
    node.args = (fused.nodes[1].outputs[0], fused.nodes[0].outputs[0])
    verify(fused)
    node.body.inputs[1].type = helpers.tt([16, 4])
    with pytest.raises(VerifyError, match=r"argument 1 \(%add: float32\[4,16\]\) does not match body input %b"):
        verify(fused)


def test_fused_outputs_mismatch(fused, helpers):
    node = fused.nodes[2]
    node.outputs.append(Value("y2", helpers.tt([4, 16])))
    with pytest.raises(VerifyError, match="2 outputs but the body returns 1"):
        verify(fused)
    node.outputs.pop()
    node.outputs[0].type = helpers.tt([4, 16], torch.float16)
    with pytest.raises(VerifyError, match=r"output %y: float16\[4,16\] does not match body output %s"):
        verify(fused)


def test_errors_inside_a_body_are_located(fused):
    body = fused.nodes[2].body
    body.nodes[0].args = (body.inputs[0], fused.inputs[1])          # closes over the outer %w
    with pytest.raises(VerifyError, match=r"^fuse: node 2 \(%y = kiln.fused\) body: node 0 \(%r = aten.mul.Tensor\): "
                                          r"argument %w is not defined before use"):
        verify(fused, "fuse")
    fused.nodes[2].attrs.pop("body")
    with pytest.raises(VerifyError, match="kiln.fused node has no body graph"):
        verify(fused)


def test_constants_must_be_bound_with_declared_type(fused):
    verify(fused)
    fused.constants["c0"] = torch.zeros(8)
    with pytest.raises(VerifyError, match=r"constant %c0 is declared float32\[16\] but its tensor is float32\[8\]"):
        verify(fused)
    fused.constants.pop("c0")
    with pytest.raises(VerifyError, match="constant %c0 has no tensor"):
        verify(fused)
    with pytest.raises(VerifyError, match="constant %c0 has no tensor"):
        verify(parse_graph(print_graph(fused)))                    # text alone does not bind tensors


def test_unknown_and_opaque_ops_are_not_inferred(helpers):
    x, y, z = Value("x", helpers.tt([2])), Value("y", helpers.tt([7, 7])), Value("z", helpers.tt([9]))
    g = Graph(inputs=[x], nodes=[Node("custom.thing", (x,), {}, [y]),
                                 Node("py.f", (y,), {}, [z], {"callable": lambda t: t})], outputs=[z])
    verify(g)

"""print_graph / parse_graph: readable, and an exact round trip (text and structure)."""
import math

import pytest
import torch

from kiln.ir import Graph, Node, Value, parse_graph, print_graph
from kiln.ir.ops import run
from kiln.ir.text import Opaque, ParseError, format_type, parse_type


def roundtrip(g, helpers, constants=None):
    text = print_graph(g)
    g2 = parse_graph(text, constants)
    assert print_graph(g2) == text
    assert helpers.same_graph(g, g2, meta=False)
    return text, g2


def test_captured_block_roundtrips(block_graph, helpers):
    text, g2 = roundtrip(block_graph, helpers)
    assert str(block_graph) == text                       # Graph.__str__ is the printer
    # every definition carries its type; the interesting ones survive exactly
    assert "aten.max.dim(" in text and "bfloat16[2,4,16]" in text and "int64[]" in text
    assert "bool[]" in text and "-inf" in text and "memory_format=torch.contiguous_format" in text
    assert "device=device(\"cpu\")" in text and "{64,0,1}" in text          # stride-0 expand
    assert "+16}" in text                                                   # split offset
    assert g2.outputs[-1] is None
    # shared Values stay shared: a use is the very object that was defined
    defs = {v.name: v for n in g2.nodes for v in n.outputs} | {v.name: v for v in g2.inputs}
    assert all(defs[v.name] is v for n in g2.nodes for v in n.inputs())


def test_fused_body_scalars_and_kwargs(fused, helpers):
    text, g2 = roundtrip(fused, helpers, constants=fused.constants)
    assert "consts(%c0: float32[16])" in text
    assert 'kiln.fused[kind="pointwise", tile=(16, 4), fill=nan](%mm, %x) {' in text
    assert "aten.clamp.default(%r, -inf, inf)" in text
    assert "%n: scalar = aten.sym_size.int(%x, 0)" in text
    assert "return (%mm, %y, None, %full, %n)" in text
    body = g2.nodes[2].body
    assert isinstance(body, Graph) and [v.name for v in body.inputs] == ["a", "b"]
    assert g2.nodes[2].attrs["tile"] == (16, 4) and math.isnan(g2.nodes[2].attrs["fill"])
    kw = g2.nodes[3].kwargs
    assert kw["dtype"] is torch.bfloat16 and kw["layout"] is torch.strided
    assert kw["device"] == torch.device("cpu") and kw["pin_memory"] is False
    assert g2.constants["c0"] is fused.constants["c0"]
    assert parse_graph(text).constants == {}              # types declared, tensors not bound
    with pytest.raises(ValueError, match="no tensor given for constant %c0"):
        parse_graph(text, {})


def test_every_arg_kind(helpers):
    tt = helpers.tt
    x = Value("x", tt([4, 1], strides=[16, 16], device="cuda:1", offset=3))
    odd, i = Value("weird name", tt([], torch.int32)), Value("i", tt([], torch.int32))
    args = (x, 1, -7, 1.0, 1e-05, -0.0, 1e300, float("inf"), float("-inf"), float("nan"), True, None,
            "s \"quoted\" ünï\n", torch.float8_e4m3fn, torch.device("cuda", 0), torch.sparse_coo,
            torch.channels_last, complex(1.5, -2.0), [], (), (x,), [1, (2, [3.5, None])], (i, [x]))
    g = Graph(inputs=[x, i], nodes=[
        Node("my.op", args, {"nan": 0.0, "posinf": 1.0, "inf_scale": 3}, [odd],
             {"flag": True, "cfg": {"a": [1, 2], "b": None}, "mixed": {"$k": (1,)}}),
        Node("aten._assert_async.msg", (odd, "boom"), {}, [])], outputs=[odd, [x, 2], (3,)])
    text, g2 = roundtrip(g, helpers)
    assert '%"weird name": int32[] = my.op[flag=true, cfg={"a": [1, 2], "b": null}, mixed={"$k": (1,)}](' in text
    assert "float32[4,1]{16,16+3}@cuda:1" in text
    a2 = g2.nodes[0].args
    assert a2[14] == torch.device("cuda:0") and a2[15] is torch.sparse_coo
    assert a2[16] is torch.channels_last and type(a2[18]) is list and type(a2[19]) is tuple
    assert [repr(a) for a in a2[1:10]] == [repr(a) for a in args[1:10]]
    assert g2.nodes[0].kwargs == {"nan": 0.0, "posinf": 1.0, "inf_scale": 3}
    assert g2.nodes[1].outputs == []


def test_type_strings_exact(helpers):
    tt = helpers.tt
    cases = [tt([]), tt([2, 3], torch.bfloat16), tt([1, 4], strides=[16, 1]), tt([3, 0]),
             tt([2, 2], strides=[1, 2], offset=5, device="cuda")]
    for t in cases:
        assert parse_type(format_type(t)) == t
    assert format_type(None) == "scalar" and parse_type("scalar") is None
    assert str(tt([1, 4], strides=[16, 1])) == "float32[1,4]{16,1}"      # size-1 dims keep their stride
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_type("floaty[2]")


def test_callable_attr_parses_to_a_node_that_refuses_to_run(helpers):
    x, y = Value("x", helpers.tt([3])), Value("y", helpers.tt([3]))
    g = Graph(inputs=[x], nodes=[Node("py.<lambda>", (x,), {}, [y], {"callable": lambda t: t * 2})],
              outputs=[y])
    text = print_graph(g)
    assert '"py.<lambda>"[callable=<callable:' in text
    g2 = parse_graph(text)
    assert print_graph(g2) == text
    marker = g2.nodes[0].attrs["callable"]
    assert isinstance(marker, Opaque)
    with pytest.raises(RuntimeError, match="cannot run <callable:.*not serialisable"):
        run(g2.nodes[0], (torch.ones(3),), {})


def test_hand_written_text_with_comments():
    g = parse_graph("""
        # a comment
        graph(%x: float32[2]) {
          %y: float32[2] = aten.neg.default(%x)   # trailing comment
          return (%y, 3)
        }""")
    assert [n.op for n in g.nodes] == ["aten.neg.default"] and g.outputs[1] == 3


@pytest.mark.parametrize("text, msg", [
    ("graph(%x: float32[2]) {\n  %y: float32[2] = aten.neg.default(%z)\n  return (%y)\n}", r"line 2:.*undefined value %z"),
    ("graph(%x: float32[2]) {\n  %x: float32[2] = aten.neg.default(%x)\n  return (%x)\n}", r"line 2:.*%x is defined twice"),
    ("graph(%x: float32[2]) {\n  %y: float32[2] = aten.neg.default(%y)\n  return (%y)\n}", "undefined value %y"),
    ("graph(%x: float32[2]) {\n  return (%x)\n", "expected '}'"),
    ("graph(%x: float32[2,3]{1}) {\n  return (%x)\n}", "1 strides for rank 2"),
    ("graph(%x) {\n  return (%x)\n}", r"expected ':'"),
    ("graph(%x: float32[2]) {\n  return ((%x))\n}", "1-tuple needs a trailing comma"),
    ("graph() {\n  return ()\n} extra", "unexpected 'extra'"),
    ("graph() {\n  return (device(\"nope\"))\n}", "bad device"),
])
def test_parse_errors_are_one_line_with_position(text, msg):
    with pytest.raises(ParseError, match=msg) as e:
        parse_graph(text)
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)

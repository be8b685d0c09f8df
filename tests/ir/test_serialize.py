"""graph_to_json / graph_from_json: strict JSON, exact round trip, clear errors on bad input."""
import copy
import json

import pytest
import torch

from kiln.ir import Graph, Node, Value, graph_from_json, graph_to_json, print_graph
from kiln.ir.ops import run
from kiln.ir.serialize import VERSION, dumps, loads
from kiln.ir.text import Opaque


def roundtrip(g, helpers, constants=None):
    s = dumps(g)
    json.loads(s, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    g2 = loads(s, constants)
    assert print_graph(g2) == print_graph(g)
    assert helpers.same_graph(g, g2, meta=False)
    assert graph_to_json(g2) == graph_to_json(g)
    return g2


def test_captured_block_roundtrips(block_graph, helpers):
    d = graph_to_json(block_graph)
    assert d["format"] == "kiln.graph" and d["version"] == VERSION
    g2 = roundtrip(block_graph, helpers)
    # shapes, strides and storage offsets survive
    assert [v.type for v in g2.output_values()] == [v.type for v in block_graph.output_values()]


def test_fused_graph_and_tagged_values(fused, helpers):
    d = graph_to_json(fused)
    n_fused = d["graph"]["nodes"][2]
    assert n_fused["attrs"]["kind"] == "pointwise" and n_fused["attrs"]["tile"] == {"$tuple": [16, 4]}
    assert n_fused["attrs"]["fill"] == {"$float": "nan"}
    assert n_fused["attrs"]["body"]["$graph"]["nodes"][1]["args"][1:] == [{"$float": "-inf"}, {"$float": "inf"}]
    assert d["graph"]["nodes"][3]["kwargs"]["dtype"] == {"$dtype": "bfloat16"}
    assert d["graph"]["constants"] == [{"name": "c0", "type": {"dtype": "float32", "shape": [16],
                                          "strides": [1], "device": "cpu", "offset": 0}}]
    assert set(d["graph"]) == {"inputs", "constants", "nodes", "outputs", "meta"}   # no tensor data
    g2 = roundtrip(fused, helpers, constants=fused.constants)
    assert g2.constants["c0"] is fused.constants["c0"]
    assert loads(dumps(fused)).constants == {}
    with pytest.raises(ValueError, match="no tensor given for constant %c0"):
        loads(dumps(fused), {"other": torch.zeros(1)})


def test_every_arg_kind(helpers):
    tt = helpers.tt
    x = Value("x", tt([4, 1], strides=[16, 16], device="cuda:1", offset=3))
    args = (x, 1, 2.0, -0.0, float("inf"), float("-inf"), float("nan"), True, None, "s\"ü", torch.int8,
            torch.device("cuda", 1), torch.sparse_coo, torch.preserve_format, complex(0.5, float("inf")),
            [], (), (x,), [1, (2, [3.5, None])], {"$v": "not a value", "k": (1,)})
    y = Value("y", None)
    g = Graph(inputs=[x], nodes=[Node("my.op", args, {"alpha": float("nan")}, [y], {"callable": print})],
              outputs=[y, [x, 2], (3,)])
    g2 = roundtrip(g, helpers)
    a = g2.nodes[0].args
    assert type(a[15]) is list and type(a[16]) is tuple and a[17][0] is g2.inputs[0]
    assert a[19] == {"$v": "not a value", "k": (1,)}                   # a dict that looks like a tag
    assert a[11] == torch.device("cuda:1") and a[13] is torch.preserve_format
    assert isinstance(g2.nodes[0].attrs["callable"], Opaque)
    with pytest.raises(RuntimeError, match="not serialisable"):
        run(g2.nodes[0], (), {})


def test_meta_keeps_jsonable_and_to_dict():
    class Plan:
        def to_dict(self):
            return {"arena_bytes": 128, "buffers": {"a": (0, 64, 1, 2)}}
    g = Graph(meta={"pass_ms": {"dce": 0.5}, "name": "m", "plan": Plan(), "fn": print,
                    "bad": float("nan")})
    meta = graph_from_json(json.loads(dumps(g))).meta
    assert meta == {"pass_ms": {"dce": 0.5}, "name": "m",
                    "plan": {"arena_bytes": 128, "buffers": {"a": [0, 64, 1, 2]}}}


def _corrupt(d, path, value=...):
    """Set (or with ... delete) a nested key given as a list of keys/indices."""
    d = copy.deepcopy(d)
    cur = d
    for k in path[:-1]:
        cur = cur[k]
    if value is ...:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return d


@pytest.mark.parametrize("path, value, msg", [
    (["version"], 99, r"unsupported kiln graph version 99 \(this kiln reads 1\)"),
    (["format"], "onnx", "not a kiln graph: expected format 'kiln.graph', got 'onnx'"),
    (["graph", "nodes"], ..., r"at graph: missing 'nodes'"),
    (["graph", "nodes", 0, "op"], 3, r"at graph.nodes\[0\].op: expected str, got int"),
    (["graph", "nodes", 1, "args", 0], {"$v": "nope"}, r"graph.nodes\[1\].args\[0\]: reference to undefined value %nope"),
    (["graph", "nodes", 1, "outputs", 0, "name"], "x", r"graph.nodes\[1\].outputs\[0\]: %x is defined twice"),
    (["graph", "inputs", 0, "type", "dtype"], "float33", "unknown dtype 'float33'"),
    (["graph", "inputs", 0, "type", "shape"], [4, "16"], r"graph.inputs\[0\].type.shape: expected a list of ints"),
    (["graph", "inputs", 0, "type", "strides"], [1], "1 strides for rank 2"),
    (["graph", "nodes", 3, "kwargs", "dtype"], {"$dtype": "float99"}, r"bad \$dtype 'float99'"),
    (["graph", "nodes", 0, "args", 1], {"$wat": 1}, r"unknown or malformed tag \$wat"),
    (["graph", "nodes", 0, "args", 1], {"$float": "1.5"}, r"unknown or malformed tag \$float"),
    (["graph", "nodes", 2, "attrs", "body", "$graph", "inputs"], 5,
     r"graph.nodes\[2\].attrs.body.inputs: expected list, got int"),
])
def test_bad_json_raises_one_line_value_error(fused, path, value, msg):
    d = _corrupt(graph_to_json(fused), path, value)
    with pytest.raises(ValueError, match=msg) as e:
        graph_from_json(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("data, msg", [("{nope", "invalid JSON"), ("[1, 2]", "not a kiln graph"),
                                       ('{"format": "kiln.graph"}', "version None")])
def test_bad_strings(data, msg):
    with pytest.raises(ValueError, match=msg):
        loads(data)

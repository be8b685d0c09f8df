"""JSON form of a Graph, for artifacts and tools: plain JSON (no NaN), versioned, self-describing.

Why a tagged encoding: JSON has no tuples, dtypes, devices or non-finite floats, and ATen cares
about all of them (``[2, 3]`` vs ``(2, 3)`` picks a different overload schema path; ``-inf`` is
a common fill value). Tags are one-key objects: ``{"$v": name}`` a Value, ``{"$tuple": [...]}``,
``{"$float": "inf"}``, ``{"$dtype": "bfloat16"}``, ``{"$device": "cuda:0"}``, ``{"$layout": ...}``,
``{"$memory_format": ...}``, ``{"$complex": [re, im]}``, ``{"$graph": {...}}`` (a fused body),
``{"$opaque": "<callable:f>"}`` (not serialisable; loads as :class:`Opaque`, which raises if run)
and ``{"$dict": {...}}`` for a dict whose own keys could be mistaken for a tag.
Constant tensors are not stored (only their names and types); bind them on load.
"""
from __future__ import annotations

import json
import math
from typing import Any

import torch

from .graph import Graph, Node, Value
from .text import Opaque, opaque_marker
from .types import TensorType, dtype_name, parse_dtype

__all__ = ["FORMAT", "VERSION", "graph_to_json", "graph_from_json", "dumps", "loads"]

FORMAT = "kiln.graph"
VERSION = 1
_ENUMS = {"$layout": torch.layout, "$memory_format": torch.memory_format}


# ---- encoding ------------------------------------------------------------------------------
def _type(t: TensorType | None) -> dict | None:
    if t is None:
        return None
    d = {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "strides": list(t.strides),
         "device": t.device, "offset": t.offset}
    ann = {k: v for k, v in t.annotations.items() if _jsonable(v)}
    if ann:
        d["annotations"] = ann
    return d


def _jsonable(x: Any) -> bool:
    try:
        json.dumps(x, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def _enc(x: Any) -> Any:
    if isinstance(x, Value):
        return {"$v": x.name}
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else {"$float": repr(x)}
    if isinstance(x, complex):
        return {"$complex": [_enc(x.real), _enc(x.imag)]}
    if isinstance(x, torch.dtype):
        return {"$dtype": dtype_name(x)}
    if isinstance(x, torch.device):
        return {"$device": str(x)}
    for tag, cls in _ENUMS.items():
        if isinstance(x, cls):
            return {tag: str(x).removeprefix("torch.")}
    if isinstance(x, list):
        return [_enc(o) for o in x]
    if isinstance(x, tuple):
        return {"$tuple": [_enc(o) for o in x]}
    if isinstance(x, Graph):
        return {"$graph": _graph(x)}
    if isinstance(x, dict) and all(isinstance(k, str) for k in x):
        d = {k: _enc(v) for k, v in x.items()}
        return {"$dict": d} if any(k.startswith("$") for k in d) else d
    return {"$opaque": opaque_marker(x, "callable" if callable(x) else "opaque").text}


def _vals(vs: list[Value]) -> list[dict]:
    return [{"name": v.name, "type": _type(v.type)} for v in vs]


def _graph(g: Graph) -> dict:
    nodes = []
    for n in g.nodes:
        d: dict[str, Any] = {"op": n.op, "args": [_enc(a) for a in n.args], "outputs": _vals(n.outputs)}
        if n.kwargs:
            d["kwargs"] = {k: _enc(v) for k, v in n.kwargs.items()}
        if n.attrs:
            d["attrs"] = {k: _enc(v) for k, v in n.attrs.items()}
        nodes.append(d)
    meta = {}
    for k, v in g.meta.items():
        if hasattr(v, "to_dict") and callable(v.to_dict):
            v = v.to_dict()
        if isinstance(k, str) and _jsonable(v):
            meta[k] = json.loads(json.dumps(v))
    return {"inputs": _vals(g.inputs), "constants": _vals(g.constant_values), "nodes": nodes,
            "outputs": [_enc(o) for o in g.outputs], "meta": meta}


def graph_to_json(g: Graph) -> dict:
    """A plain-JSON dict (strict: no NaN/inf). Meta keeps JSON-able entries and ``to_dict()``
    results of objects that have one (e.g. a MemoryPlan); other entries are dropped."""
    return {"format": FORMAT, "version": VERSION, "graph": _graph(g)}


# ---- decoding ------------------------------------------------------------------------------
class _Bad(Exception):
    pass


def _get(d: Any, key: str, kind: type | tuple, path: str, default: Any = ...) -> Any:
    if not isinstance(d, dict):
        raise _Bad(f"{path}: expected an object, got {type(d).__name__}")
    if key not in d:
        if default is not ...:
            return default
        raise _Bad(f"{path}: missing {key!r}")
    v = d[key]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise _Bad(f"{path}.{key}: expected {getattr(kind, '__name__', kind)}, got {type(v).__name__}")
    return v


def _ints(x: Any, path: str) -> tuple[int, ...]:
    if not isinstance(x, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        raise _Bad(f"{path}: expected a list of ints")
    return tuple(x)


def _dec_type(d: Any, path: str) -> TensorType | None:
    if d is None:
        return None
    try:
        dt = parse_dtype(_get(d, "dtype", str, path))
    except ValueError as e:
        raise _Bad(f"{path}: {e}") from None
    shape = _ints(_get(d, "shape", list, path), path + ".shape")
    strides = _ints(_get(d, "strides", list, path), path + ".strides")
    if len(strides) != len(shape):
        raise _Bad(f"{path}: {len(strides)} strides for rank {len(shape)}")
    return TensorType(shape, dt, strides, _get(d, "device", str, path, "cpu"),
                      _get(d, "offset", int, path, 0), dict(_get(d, "annotations", dict, path, {})))


class _Decoder:
    def __init__(self, constants: dict | None):
        self.constants = constants

    def value(self, x: Any, scopes: list[dict], path: str) -> Any:
        if isinstance(x, list):
            return [self.value(o, scopes, f"{path}[{i}]") for i, o in enumerate(x)]
        if not isinstance(x, dict):
            if x is None or isinstance(x, (bool, int, float, str)):
                return x
            raise _Bad(f"{path}: unexpected {type(x).__name__}")
        if len(x) != 1 or not next(iter(x)).startswith("$"):
            return {k: self.value(v, scopes, f"{path}.{k}") for k, v in x.items()}
        tag, v = next(iter(x.items()))
        try:
            if tag == "$v":
                for s in reversed(scopes):
                    if v in s:
                        return s[v]
                raise _Bad(f"{path}: reference to undefined value %{v}")
            if tag == "$tuple":
                if not isinstance(v, list):
                    raise _Bad(f"{path}: $tuple needs a list")
                return tuple(self.value(o, scopes, f"{path}[{i}]") for i, o in enumerate(v))
            if tag == "$dict":
                if not isinstance(v, dict):
                    raise _Bad(f"{path}: $dict needs an object")
                return {k: self.value(o, scopes, f"{path}.{k}") for k, o in v.items()}
            if tag == "$float" and v in ("inf", "-inf", "nan"):
                return float(v)
            if tag == "$complex":
                re_, im = (self.value(o, scopes, path) for o in v)
                return complex(re_, im)
            if tag == "$dtype":
                return parse_dtype(v)
            if tag == "$device":
                return torch.device(v)
            if tag in _ENUMS:
                e = getattr(torch, v, None)
                if isinstance(e, _ENUMS[tag]):
                    return e
            if tag == "$graph":
                return self.graph(v, scopes, path)
            if tag == "$opaque" and isinstance(v, str):
                return Opaque(v)
        except (ValueError, TypeError, RuntimeError) as e:
            raise _Bad(f"{path}: bad {tag} {v!r} ({e})") from None
        raise _Bad(f"{path}: unknown or malformed tag {tag} {v!r}")

    def defs(self, items: Any, scope: dict, path: str) -> list[Value]:
        if not isinstance(items, list):
            raise _Bad(f"{path}: expected a list")
        out = []
        for i, d in enumerate(items):
            p = f"{path}[{i}]"
            name = _get(d, "name", str, p)
            if name in scope:
                raise _Bad(f"{p}: %{name} is defined twice")
            scope[name] = Value(name, _dec_type(_get(d, "type", (dict, type(None)), p), p + ".type"))
            out.append(scope[name])
        return out

    def graph(self, d: Any, scopes: list[dict], path: str) -> Graph:
        scope: dict[str, Value] = {}
        scopes = scopes + [scope]
        g = Graph()
        g.inputs = self.defs(_get(d, "inputs", list, path), scope, path + ".inputs")
        g.constant_values = self.defs(_get(d, "constants", list, path, []), scope, path + ".constants")
        if self.constants is not None:
            for v in g.constant_values:
                if v.name not in self.constants:
                    raise _Bad(f"{path}: no tensor given for constant %{v.name}")
                g.constants[v.name] = self.constants[v.name]
        for i, nd in enumerate(_get(d, "nodes", list, path)):
            p = f"{path}.nodes[{i}]"
            op = _get(nd, "op", str, p)
            args = self.value(_get(nd, "args", list, p), scopes, p + ".args")
            kwargs = {k: self.value(v, scopes, f"{p}.kwargs.{k}")
                      for k, v in _get(nd, "kwargs", dict, p, {}).items()}
            attrs = {k: self.value(v, scopes, f"{p}.attrs.{k}")
                     for k, v in _get(nd, "attrs", dict, p, {}).items()}
            outs = self.defs(_get(nd, "outputs", list, p), scope, p + ".outputs")
            g.nodes.append(Node(op, tuple(args), kwargs, outs, attrs))
        g.outputs = self.value(_get(d, "outputs", list, path), scopes, path + ".outputs")
        g.meta = dict(_get(d, "meta", dict, path, {}))
        return g


def graph_from_json(d: dict, constants: dict | None = None) -> Graph:
    """Inverse of :func:`graph_to_json`; ``constants`` (name -> tensor) binds declared constants.
    Raises ValueError (one line) on an unknown format/version or malformed data."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"not a kiln graph: expected format {FORMAT!r}, got {got!r}")
    if d.get("version") != VERSION:
        raise ValueError(f"unsupported kiln graph version {d.get('version')!r} (this kiln reads {VERSION})")
    try:
        return _Decoder(constants).graph(d.get("graph"), [], "graph")
    except _Bad as e:
        raise ValueError(f"malformed kiln graph JSON at {e}") from None


def dumps(g: Graph, **kw) -> str:
    return json.dumps(graph_to_json(g), allow_nan=False, **kw)


def loads(s: str, constants: dict | None = None) -> Graph:
    try:
        d = json.loads(s)
    except json.JSONDecodeError as e:
        raise ValueError(f"not a kiln graph: invalid JSON ({e})") from None
    return graph_from_json(d, constants)

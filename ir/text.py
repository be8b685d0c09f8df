"""Text form of a Graph: a readable printer and a parser that reads it back exactly.

Why: passes are debugged and tested by eye, and hand-written IR makes small test cases cheap.
``parse_graph(print_graph(g))`` prints identically and gives equal structure, types and args.

    graph(%x: float32[4,16], %w: float32[16,16]) consts(%c0: float32[16]) {
      %add: float32[4,16] = aten.add.Tensor(%x, %c0)
      %y: float32[4,16] = kiln.fused[kind="pointwise"](%add, %x) {
        graph(%a: float32[4,16], %b: float32[4,16]) {
          %r: float32[4,16] = aten.mul.Tensor(%a, %b)
          return (%r)
        }
      }
      return (%y, None)
    }

Types print as ``TensorType.__str__`` (``dtype[shape]{strides+offset}@device``) or ``scalar``.
Constant tensors are not printed; ``parse_graph(text, constants)`` binds them by name.
Attributes print as JSON where JSON is exact; ``attrs["body"]`` prints as a nested block; a
Python callable (or any other unprintable object) prints as a ``<...>`` marker that parses to an
:class:`Opaque` placeholder, which raises if the node is run.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import torch

from .graph import Graph, Node, Value
from .types import TensorType, contiguous_strides, dtype_name, parse_dtype

__all__ = ["print_graph", "parse_graph", "format_type", "parse_type", "Opaque", "ParseError"]


class ParseError(ValueError):
    """Malformed graph text; the message gives line:column."""


class Opaque:
    """Stands in for an object the text/JSON forms cannot hold (a Python callable, say).
    Truthy, compares by its marker text, and raises a clear error if called."""
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"cannot run {self.text}: this graph was loaded from text/JSON and the "
                           "Python object was not serialisable; recapture the graph instead")

    def __eq__(self, other):
        return isinstance(other, Opaque) and other.text == self.text

    def __hash__(self):
        return hash(self.text)

    def __repr__(self):
        return self.text


def opaque_marker(obj: Any, kind: str = "opaque") -> Opaque:
    """Marker for an unprintable object, e.g. ``<callable:auto_functionalized>``."""
    if isinstance(obj, Opaque):
        return obj
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
    return Opaque(f"<{kind}:{re.sub(r'[^A-Za-z0-9_.:-]', '_', str(name))}>")


# ---- printing ------------------------------------------------------------------------------
_IDENT = re.compile(r"[A-Za-z_][\w.]*\Z")
_NAME = re.compile(r"[\w.]+\Z")
_TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)


def format_type(t: TensorType | None) -> str:
    return "scalar" if t is None else str(t)


def _name(v: Value) -> str:
    return "%" + (v.name if _NAME.match(v.name) else json.dumps(v.name))


def _ident(s: str) -> str:
    return s if _IDENT.match(s) else json.dumps(s)


def _json_exact(x: Any) -> bool:
    """True where json round-trips x to an equal value of the same types (no tuples, no NaN)."""
    if x is None or isinstance(x, (bool, int, str)):
        return True
    if isinstance(x, float):
        return math.isfinite(x)
    if type(x) is list:
        return all(_json_exact(o) for o in x)
    if type(x) is dict:
        return all(isinstance(k, str) and _json_exact(o) for k, o in x.items())
    return False


def format_value(x: Any) -> str:
    """One argument (or output, or attribute) in the text form."""
    if isinstance(x, Value):
        return _name(x)
    if x is None or isinstance(x, (bool, int)):
        return repr(x)
    if isinstance(x, float):
        return repr(x)                                   # exact; inf, -inf, nan included
    if isinstance(x, complex):
        return f"complex({x.real!r}, {x.imag!r})"
    if isinstance(x, str):
        return json.dumps(x)
    if isinstance(x, _TORCH_ENUMS):
        return str(x)                                     # torch.float32, torch.strided, ...
    if isinstance(x, torch.device):
        return f"device({json.dumps(str(x))})"
    if isinstance(x, list):
        return "[" + ", ".join(map(format_value, x)) + "]"
    if isinstance(x, tuple):
        return "(" + ", ".join(map(format_value, x)) + ("," if len(x) == 1 else "") + ")"
    if isinstance(x, dict) and all(isinstance(k, str) for k in x):
        return "{" + ", ".join(f"{json.dumps(k)}: {format_value(v)}" for k, v in x.items()) + "}"
    return opaque_marker(x, "callable" if callable(x) else "opaque").text


def _format_attr(key: str, val: Any) -> str:
    if key == "callable":
        val = opaque_marker(val, "callable")
    return f"{_ident(key)}={json.dumps(val) if _json_exact(val) else format_value(val)}"


def _defs(vs: list[Value]) -> str:
    return ", ".join(f"{_name(v)}: {format_type(v.type)}" for v in vs)


def _print(g: Graph, ind: str, lines: list[str]) -> None:
    head = f"{ind}graph({_defs(g.inputs)})"
    if g.constant_values:
        head += f" consts({_defs(g.constant_values)})"
    lines.append(head + " {")
    for n in g.nodes:
        attrs = [_format_attr(k, v) for k, v in n.attrs.items() if not (k == "body" and isinstance(v, Graph))]
        call = _ident(n.op) + (f"[{', '.join(attrs)}]" if attrs else "")
        call += "(" + ", ".join([format_value(a) for a in n.args] +
                                [f"{_ident(k)}={format_value(v)}" for k, v in n.kwargs.items()]) + ")"
        lhs = f"{_defs(n.outputs)} = " if n.outputs else ""
        if isinstance(n.attrs.get("body"), Graph):
            lines.append(f"{ind}  {lhs}{call} {{")
            _print(n.attrs["body"], ind + "    ", lines)
            lines.append(f"{ind}  }}")
        else:
            lines.append(f"{ind}  {lhs}{call}")
    lines.append(f"{ind}  return ({', '.join(map(format_value, g.outputs))})")
    lines.append(f"{ind}}}")


def print_graph(g: Graph) -> str:
    lines: list[str] = []
    _print(g, "", lines)
    return "\n".join(lines) + "\n"


# ---- parsing -------------------------------------------------------------------------------
_TOKEN = re.compile(r"""
    (?P<type>(?<=:)\s*(?:scalar\b|\w+\[[\d,]*\](?:\{[-\d,]*(?:\+\d+)?\})?(?:@[\w:]+)?))
  | (?P<ws>\s+|\#[^\n]*)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<num>-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+|(?:inf|nan)(?![\w.])(?!\s*=)))
  | (?P<name>%(?:[\w.]+|"(?:[^"\\]|\\.)*"))
  | (?P<ident>[A-Za-z_][\w.]*)
  | (?P<marker><[^<>\n]*>)
  | (?P<punct>[()\[\]{},=:])
""", re.VERBOSE)
_TYPE = re.compile(r"(\w+)\[([\d,]*)\](?:\{([-\d,]*)(?:\+(\d+))?\})?(?:@([\w:]+))?\Z")


def _ints(s: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in s.split(",") if p) if s else ()


def parse_type(s: str) -> TensorType | None:
    """Inverse of :func:`format_type`."""
    s = s.strip()
    if s == "scalar":
        return None
    m = _TYPE.match(s)
    if not m:
        raise ValueError(f"bad type {s!r}")
    shape = _ints(m.group(2))
    strides = _ints(m.group(3)) if m.group(3) is not None else contiguous_strides(shape)
    if len(strides) != len(shape):
        raise ValueError(f"type {s!r}: {len(strides)} strides for rank {len(shape)}")
    return TensorType(shape, parse_dtype(m.group(1)), strides, m.group(5) or "cpu", int(m.group(4) or 0))


class _Parser:
    def __init__(self, text: str, constants: dict | None):
        self.text, self.constants = text, constants
        self.toks: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                self.pos = pos
                self.fail(f"unexpected character {text[pos]!r}")
            if m.lastgroup != "ws":
                self.toks.append((m.lastgroup, m.group().strip(), m.start()))
            pos = m.end()
        self.toks.append(("eof", "", len(text)))
        self.i = 0

    def fail(self, msg: str, at: int | None = None):
        pos = self.toks[self.i][2] if at is None else at
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        raise ParseError(f"line {line}:{col}: {msg}")

    def peek(self, k: int = 0) -> tuple[str, str, int]:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def next(self) -> tuple[str, str, int]:
        t = self.toks[self.i]
        self.i += 1
        return t

    def accept(self, text: str) -> bool:
        if self.peek()[1] == text and self.peek()[0] in ("punct", "ident"):
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> None:
        if not self.accept(text):
            self.fail(f"expected {text!r}, got {self.peek()[1] or 'end of input'!r}")

    def ident(self) -> str:
        kind, val, _ = self.next()
        if kind == "ident":
            return val
        if kind == "str":
            return json.loads(val)
        self.i -= 1
        self.fail(f"expected a name, got {val or 'end of input'!r}")

    def seq(self, close: str, item) -> list:
        out = []
        while not self.accept(close):
            out.append(item())
            if not self.accept(","):
                self.expect(close)
                break
        return out

    # -- values
    def lookup(self, scopes: list[dict], name: str) -> Value:
        for s in reversed(scopes):
            if name in s:
                return s[name]
        self.i -= 1
        self.fail(f"undefined value %{name}")

    @staticmethod
    def vname(tok: str) -> str:
        return json.loads(tok[1:]) if tok[1:2] == '"' else tok[1:]

    def value(self, scopes: list[dict]) -> Any:
        kind, tok, pos = self.next()
        if kind == "name":
            return self.lookup(scopes, self.vname(tok))
        if kind == "num":
            return float(tok) if any(c in tok for c in ".eEin") else int(tok)
        if kind == "str":
            return json.loads(tok)
        if kind == "marker":
            return Opaque(tok)
        if kind == "ident":
            simple = {"None": None, "null": None, "True": True, "true": True, "False": False, "false": False}
            if tok in simple:
                return simple[tok]
            if tok.startswith("torch.") and isinstance(getattr(torch, tok[6:], None), _TORCH_ENUMS):
                return getattr(torch, tok[6:])
            if tok in ("device", "complex") and self.accept("("):
                a = self.seq(")", lambda: self.value(scopes))
                try:
                    return torch.device(*a) if tok == "device" else complex(*a)
                except (TypeError, RuntimeError) as e:
                    self.fail(f"bad {tok}{tuple(a)}: {e}", pos)
        if tok == "[":
            return self.seq("]", lambda: self.value(scopes))
        if tok == "(":
            items, trailing = [], False
            while not self.accept(")"):
                items.append(self.value(scopes))
                trailing = self.accept(",")
                if not trailing:
                    self.expect(")")
                    break
            if len(items) == 1 and not trailing:
                self.fail("a 1-tuple needs a trailing comma: (x,)", pos)
            return tuple(items)
        if tok == "{":
            def item():
                k = self.next()
                if k[0] != "str":
                    self.fail("dict keys must be strings", k[2])
                self.expect(":")
                return json.loads(k[1]), self.value(scopes)
            return dict(self.seq("}", item))
        self.fail(f"expected a value, got {tok or 'end of input'!r}", pos)

    def defn(self, scope: dict, into: dict | None = None) -> Value:
        """``%name: type``; a node's outputs go to ``into`` until its arguments are parsed."""
        into = scope if into is None else into
        kind, tok, _ = self.next()
        if kind != "name":
            self.i -= 1
            self.fail(f"expected a %value definition, got {tok!r}")
        name = self.vname(tok)
        if name in scope or name in into:
            self.i -= 1
            self.fail(f"%{name} is defined twice")
        self.expect(":")
        kind, ty, pos = self.next()
        if kind != "type":
            self.fail(f"expected a type after %{name}:", pos)
        try:
            v = Value(name, parse_type(ty))
        except ValueError as e:
            self.fail(str(e), pos)
        into[name] = v
        return v

    # -- graphs
    def graph(self, scopes: list[dict]) -> Graph:
        scope: dict[str, Value] = {}
        scopes = scopes + [scope]
        g = Graph()
        self.expect("graph")
        self.expect("(")
        g.inputs = self.seq(")", lambda: self.defn(scope))
        if self.accept("consts"):
            self.expect("(")
            g.constant_values = self.seq(")", lambda: self.defn(scope))
            if self.constants is not None:
                for v in g.constant_values:
                    if v.name not in self.constants:
                        raise ParseError(f"no tensor given for constant %{v.name}")
                    g.constants[v.name] = self.constants[v.name]
        self.expect("{")
        while not self.accept("return"):
            g.nodes.append(self.node(scopes, scope))
        self.expect("(")
        g.outputs = self.seq(")", lambda: self.value(scopes))
        self.expect("}")
        return g

    def node(self, scopes: list[dict], scope: dict) -> Node:
        outs: list[Value] = []
        pending: dict[str, Value] = {}
        if self.peek()[0] == "name":
            outs = [self.defn(scope, pending)]
            while self.accept(","):
                outs.append(self.defn(scope, pending))
            self.expect("=")
        op = self.ident()
        attrs: dict[str, Any] = {}
        if self.accept("["):
            def attr():
                k = self.ident()
                self.expect("=")
                attrs[k] = self.value(scopes)
            self.seq("]", attr)
        self.expect("(")
        args, kwargs = [], {}

        def arg():
            if self.peek()[0] in ("ident", "str") and self.peek(1)[1] == "=":
                k = self.ident()
                self.next()
                kwargs[k] = self.value(scopes)
            elif kwargs:
                self.fail("positional argument after keyword argument")
            else:
                args.append(self.value(scopes))
        self.seq(")", arg)
        if self.accept("{"):
            attrs["body"] = self.graph(scopes)
            self.expect("}")
        scope.update(pending)
        return Node(op, tuple(args), kwargs, outs, attrs)


def parse_graph(text: str, constants: dict | None = None) -> Graph:
    """Parse :func:`print_graph` output. ``constants`` (name -> tensor) binds declared constants;
    without it the graph's ``constants`` dict stays empty (types are still declared)."""
    p = _Parser(text, constants)
    g = p.graph([])
    if p.peek()[0] != "eof":
        p.fail(f"unexpected {p.peek()[1]!r} after the graph")
    return g

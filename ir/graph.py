"""Values, nodes and graphs: kiln's IR.

A node applies one op (an ATen overload name such as ``aten.add.Tensor``, or a kiln op such as
``kiln.fused`` whose body is a nested Graph) to arguments that mix Values and constants.
Graphs are plain data: passes build new node lists rather than mutating shared state.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator

from .types import TensorType


class Value:
    """One SSA value. ``type`` is a TensorType, or None for non-tensor results."""
    __slots__ = ("name", "type")

    def __init__(self, name: str, type: TensorType | None):
        self.name = name
        self.type = type

    def __repr__(self) -> str:
        return f"%{self.name}"


@dataclass
class Node:
    op: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    outputs: list[Value] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)   # pass decisions (e.g. a fused body, a kernel name)

    def inputs(self) -> list[Value]:
        return [v for v in iter_values((self.args, self.kwargs))]

    @property
    def out(self) -> Value:
        return self.outputs[0]

    @property
    def body(self) -> "Graph | None":
        return self.attrs.get("body")


def iter_values(obj: Any) -> Iterator[Value]:
    if isinstance(obj, Value):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from iter_values(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from iter_values(o)


def map_values(obj: Any, fn) -> Any:
    """Rebuild a nested args structure with every Value replaced by fn(value)."""
    if isinstance(obj, Value):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_values(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_values(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_values(o, fn) for k, o in obj.items()}
    return obj


@dataclass
class Graph:
    """inputs: runtime arguments; constants: values bound to tensors at compile time (weights);
    outputs: Values, or plain constants (None, ints) where the captured function returns those."""
    inputs: list[Value] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    constants: dict[str, Any] = field(default_factory=dict)      # value name -> torch.Tensor
    constant_values: list[Value] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    # ---- queries -------------------------------------------------------------------------
    def leaves(self) -> list[Value]:
        return self.inputs + self.constant_values

    def producers(self) -> dict[str, Node]:
        return {v.name: n for n in self.nodes for v in n.outputs}

    def users(self) -> dict[str, list[Node]]:
        u: dict[str, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs():
                u.setdefault(v.name, []).append(n)
        return u

    def output_values(self) -> list[Value]:
        return [v for v in iter_values(self.outputs)]

    def all_nodes(self) -> Iterator[Node]:
        """Every node, descending into fused bodies."""
        for n in self.nodes:
            yield n
            if n.body is not None:
                yield from n.body.all_nodes()

    def copy(self, nodes=None) -> "Graph":
        return Graph(list(self.inputs), list(self.nodes if nodes is None else nodes), list(self.outputs),
                     dict(self.constants), list(self.constant_values), dict(self.meta))

    def fresh_namer(self, prefix: str = "v"):
        taken = {v.name for v in self.leaves()} | {v.name for n in self.all_nodes() for v in n.outputs}
        for i in itertools.count():
            name = f"{prefix}{i}"
            if name not in taken:
                taken.add(name)
                yield name

    def __str__(self) -> str:
        from .text import print_graph
        return print_graph(self)

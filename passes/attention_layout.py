"""Where an attention operand's elements live: from a batched matmul's operand, walk back through
views, copies, casts and scalar scalings to the tensor that holds the data (the *source*), and
describe the operand as a strided layout of the source's storage.

Why: models reach ``bmm(q, kᵀ)`` through reshapes, transposes, ``contiguous()`` copies, GQA's
expand + reshape and the fused-QKV split, and each spelling leaves a different chain. Replaying
the chain on a layout (CuTe-style: each dim a list of (size, stride) sub-dims, so merging dims
never fails and an expanded head stays a stride-0 sub-dim) answers every spelling the same
way: the kernel reads the source directly, and the copies in between become dead code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kiln.ir import Node, Value
from kiln.ir.types import TensorType

Sub = tuple[int, int]          # (size, stride) in elements of the source's storage


class NotAnalysable(Exception):
    """The chain does something a strided layout cannot express."""


@dataclass
class Layout:
    dims: list[list[Sub]]      # per logical dim, its sub-dims outer -> inner (size-1 sub-dims dropped)
    offset: int = 0
    aliased: bool = True       # still a view of the source's storage (no copy since)

    @staticmethod
    def of(t: TensorType) -> "Layout":
        return Layout([[(s, st)] if s != 1 else [] for s, st in zip(t.shape, t.strides)], t.offset)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(math.prod(s for s, _ in d) for d in self.dims)

    def _new(self, dims, offset=None, aliased=None) -> "Layout":
        return Layout(dims, self.offset if offset is None else offset, self.aliased if aliased is None else aliased)

    def _dim(self, d: int) -> int:
        n = len(self.dims)
        if not -n <= d < max(n, 1):
            raise NotAnalysable(f"dim {d} out of range")
        return d % n

    def permute(self, perm) -> "Layout":
        return self._new([self.dims[self._dim(p)] for p in perm])

    def transpose(self, a: int, b: int) -> "Layout":
        perm = list(range(len(self.dims)))
        a, b = self._dim(a), self._dim(b)
        perm[a], perm[b] = perm[b], perm[a]
        return self.permute(perm)

    def expand(self, sizes) -> "Layout":
        sizes = list(sizes)
        dims = [[] for _ in range(len(sizes) - len(self.dims))] + [list(d) for d in self.dims]
        shape = (1,) * (len(sizes) - len(self.dims)) + self.shape
        out = []
        for d, have, want in zip(dims, shape, sizes):
            if want == -1 or want == have:
                out.append(d)
            elif have == 1:
                out.append([(want, 0)])
            else:
                raise NotAnalysable(f"expand {have} -> {want}")
        return self._new(out)

    def reshape(self, sizes) -> "Layout":
        """Regroup the sub-dims in row-major order: view/reshape semantics, with or without a copy."""
        sizes = list(sizes)
        total = math.prod(self.shape)
        if -1 in sizes:
            known = math.prod(s for s in sizes if s != -1)
            sizes[sizes.index(-1)] = total // known if known else 0
        if math.prod(sizes) != total:
            raise NotAnalysable("reshape changes the number of elements")
        flat = [sd for d in self.dims for sd in d]
        i, out = 0, []
        for n in sizes:
            group, need = [], n
            while need > 1:
                size, st = flat[i]
                if size <= need:
                    if need % size:
                        raise NotAnalysable("reshape splits a sub-dim unevenly")
                    group.append((size, st))
                    need //= size
                    i += 1
                else:
                    if size % need:
                        raise NotAnalysable("reshape splits a sub-dim unevenly")
                    group.append((need, st * (size // need)))
                    flat[i] = (size // need, st)
                    need = 1
            out.append(group)
        return self._new(out)

    def unsqueeze(self, d: int) -> "Layout":
        d = d % (len(self.dims) + 1)
        return self._new(self.dims[:d] + [[]] + self.dims[d:])

    def squeeze(self, dims=None) -> "Layout":
        drop = {self._dim(d) for d in dims} if dims is not None else set(range(len(self.dims)))
        return self._new([d for i, d in enumerate(self.dims) if i not in drop or self.shape[i] != 1])

    def single(self, d: int) -> Sub:
        """Dim ``d`` as one (size, stride), merging its sub-dims where they are contiguous."""
        subs = coalesce(self.dims[self._dim(d)])
        if len(subs) > 1:
            raise NotAnalysable("a dim spans sub-dims no single stride describes")
        return subs[0] if subs else (1, 0)

    def slice(self, d: int, start, end, step=1) -> "Layout":
        d = self._dim(d)
        n, st = self.single(d)
        start = 0 if start is None else (start + n if start < 0 else start)
        end = n if end is None else min(end + n if end < 0 else end, n)
        length = max(0, -(-(end - start) // step))
        dims = list(self.dims)
        dims[d] = [(length, st * step)] if length != 1 else []
        return self._new(dims, self.offset + start * st)

    def select(self, d: int, idx: int) -> "Layout":
        d = self._dim(d)
        idx = idx + self.shape[d] if idx < 0 else idx
        off = self.offset
        for size, st in reversed(self.dims[d]):
            off += (idx % size) * st
            idx //= size
        return self._new(self.dims[:d] + self.dims[d + 1:], off)

    def as_strided(self, sizes, strides, offset) -> "Layout":
        if not self.aliased:
            raise NotAnalysable("as_strided of a copy")
        return self._new([[(s, st)] if s != 1 else [] for s, st in zip(sizes, strides)], offset)


def mirrors(lay: Layout, t: TensorType) -> bool:
    """Does a tensor of type ``t`` hold each element of ``lay`` at the same storage position?"""
    own = Layout.of(t)
    return lay.offset == own.offset and len(lay.dims) == len(own.dims) and \
        all(coalesce(a) == coalesce(b) for a, b in zip(lay.dims, own.dims))


def coalesce(subs: list[Sub]) -> list[Sub]:
    out: list[Sub] = []
    for size, st in subs:
        if size == 1:
            continue
        if out and out[-1][1] == size * st:
            out[-1] = (out[-1][0] * size, st)
        else:
            out.append((size, st))
    return out


def split_outer(subs: list[Sub], outer: int) -> tuple[list[Sub], list[Sub]]:
    """Split one dim's sub-dims into an outer part of ``outer`` elements and the rest."""
    subs, head = list(subs), []
    while outer > 1:
        if not subs:
            raise NotAnalysable("split past the end")
        size, st = subs.pop(0)
        if size <= outer:
            if outer % size:
                raise NotAnalysable("uneven split")
            head.append((size, st))
            outer //= size
        else:
            if size % outer:
                raise NotAnalysable("uneven split")
            head.append((outer, st * (size // outer)))
            subs.insert(0, (size // outer, st))
            outer = 1
    return head, subs


# ---- walking a chain back to its source --------------------------------------------------------
VIEW_OPS = {"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.permute.default",
            "aten.expand.default", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims",
            "aten.squeeze.default", "aten.slice.Tensor", "aten.select.int", "aten.alias.default",
            "aten.t.default", "aten.transpose.int", "aten.as_strided.default", "aten.detach.default",
            "aten.split.Tensor", "aten.split_with_sizes.default", "aten.unbind.int"}
COPY_OPS = {"aten.clone.default", "aten._to_copy.default", "prims.convert_element_type.default",
            "aten.lift_fresh_copy.default"}
SCALE_OPS = {"aten.mul.Tensor": 1, "aten.mul.Scalar": 1, "aten.div.Tensor": -1, "aten.div.Scalar": -1}


def is_copy(n: Node) -> bool:
    """A copy that keeps every element's value up to a dtype cast (no device or layout change)."""
    return n.op in COPY_OPS and not ({"device", "layout"} & set(n.kwargs)) and len(n.args) <= 2


def rounds(n: Node) -> bool:
    """A cast to a float type with fewer bits (or another of the same width): its elements are
    not the source's, so an operand is not traced through it (fp32 -> bf16 -> fp32 reads as the
    bf16 values eager computes with, not the fp32 ones before the rounding)."""
    a, b = n.args[0].type.dtype, n.out.type.dtype
    return a != b and a.is_floating_point and b.is_floating_point and torch.finfo(b).bits <= torch.finfo(a).bits


def apply_view(lay: Layout, n: Node, out: Value) -> Layout:
    op, a = n.op, n.args
    if op in ("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default"):
        return lay.reshape(a[1])
    if op == "aten.permute.default":
        return lay.permute(a[1])
    if op == "aten.expand.default":
        return lay.expand(a[1])
    if op == "aten.unsqueeze.default":
        return lay.unsqueeze(a[1])
    if op.startswith("aten.squeeze."):
        return lay.squeeze(None if op == "aten.squeeze.default" else ([a[1]] if isinstance(a[1], int) else a[1]))
    if op == "aten.slice.Tensor":
        d, start, end, step = (list(a[1:]) + [0, None, None, 1][len(a) - 1:])[:4]
        return lay.slice(d, start, end, step)
    if op == "aten.select.int":
        return lay.select(a[1], a[2])
    if op in ("aten.alias.default", "aten.detach.default"):
        return lay
    if op == "aten.t.default":
        return lay.transpose(0, 1) if len(lay.dims) == 2 else lay
    if op == "aten.transpose.int":
        return lay.transpose(a[1], a[2])
    if op == "aten.as_strided.default":
        return lay.as_strided(a[1], a[2], a[3] if len(a) > 3 and a[3] is not None else lay.offset)
    if op in ("aten.split.Tensor", "aten.split_with_sizes.default"):
        i = next(i for i, v in enumerate(n.outputs) if v is out)
        d = a[2] if len(a) > 2 else n.kwargs.get("dim", 0)
        sizes = [a[1]] * len(n.outputs) if op == "aten.split.Tensor" else list(a[1])
        start = sum(sizes[:i])
        return lay.slice(d, start, start + out.type.shape[d % len(lay.dims)])
    if op == "aten.unbind.int":
        i = next(i for i, v in enumerate(n.outputs) if v is out)
        return lay.select(a[1] if len(a) > 1 else 0, i)
    raise NotAnalysable(op)


@dataclass
class Traced:
    src: Value                 # the tensor whose storage holds the operand's elements
    layout: Layout             # the operand as a layout of src's storage
    scale: float = 1.0         # scalar factors met on the way (folded into the attention scale)
    nodes: list[Node] = field(default_factory=list)


def trace(v: Value, producers: dict[str, Node], scalar_of) -> Traced:
    """Walk from ``v`` back to its source; ``scalar_of(arg)`` gives a compile-time scalar or None."""
    chain: list[tuple[Node, Value]] = []
    scale, cur = 1.0, v
    while True:
        n = producers.get(cur.name)
        if n is None or not n.args or not isinstance(n.args[0], Value) or n.args[0].type is None:
            break
        if n.op in SCALE_OPS:
            c = scalar_of(n.args[1]) if len(n.args) > 1 else None
            if c is None or c == 0 or n.args[0].type.shape != cur.type.shape:
                break
            scale *= c if SCALE_OPS[n.op] == 1 else 1.0 / c
        elif not (n.op in VIEW_OPS or is_copy(n) and not rounds(n)):
            break
        chain.append((n, cur))
        cur = n.args[0]
    lay = Layout.of(cur.type)
    for n, out in reversed(chain):
        if n.op in VIEW_OPS:
            lay = apply_view(lay, n, out)
        else:           # a copy, cast or scaling: same elements in a fresh tensor, which still
            # mirrors the source's storage if it puts every element where the source has it
            # (e.g. a cast of a contiguous tensor), so a later as_strided reads the same elements
            lay = lay._new(lay.dims, aliased=lay.aliased and mirrors(lay, out.type))
        if lay.shape != tuple(out.type.shape):
            raise NotAnalysable(f"layout of {n.op} gives {lay.shape}, IR says {tuple(out.type.shape)}")
    return Traced(cur, lay, scale, [n for n, _ in chain])

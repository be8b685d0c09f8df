"""In-place reuse: a fused kernel (or a matmul's epilogue) writes an output over an input whose
last use it is, so the two share one buffer. Legal only where every element of the input is read
before the same element of the output is written and never read after; decided here from the
kernel's loop plan and recorded in the MemoryPlan (``aliases``: output -> buffer, ``overwrites``:
output -> input).

What the renderers guarantee, and this pass relies on: a pointwise kernel loads a block, computes
and stores it (each element handled by one program); a Triton reduction kernel stores its
per-element (xr) outputs only at the end of a one-pass row or in the final loop over the row,
after the loads of the same elements in that loop, and no later loop reads the row again. The
numba renderer may stash a value in an output before its final loop, so on the cpu target only
pointwise kernels run in place; CUDA C kernels declare pointers __restrict__, so none do.

In dynamic mode, where every value is a tensor of its own, more may run in place
(dynamic_overwrites): a kernel over any tensor the graph made, and an ATen op that has an in-place
form (an embedding's gradient: index_put into a zero fill) over its first argument; the runtime
then calls the in-place form."""
from __future__ import annotations

from kiln.ir import Graph, Node, OpKind, Value, op_kind

PLACES = {"triton": ("pointwise", "reduction"), "cpu": ("pointwise",), "cuda": ()}


def _full_strides(t, dmap, nd) -> tuple:
    st = [0] * nd
    for s, stride, d in zip(t.shape, t.strides, dmap):
        if d is not None and s != 1:
            st[d] = stride
    return tuple(st)


def inner_names(n: Node, name: str) -> set[str]:
    """The names a fused node's body reads the outer value ``name`` by: its body inputs pair with
    its arguments by position, and passes that alias a value away (drop_copy_kernels) rename the
    arguments, not the body."""
    return {v.name for v, a in zip(n.body.inputs, n.args) if getattr(a, "name", None) == name}


def elementwise_safe(n: Node, out, inp, target: str = "cpu") -> bool:
    """Can output ``out`` of fused node ``n`` overwrite input ``inp``? Only if every load of
    ``inp`` (by a pointwise op of the body) reads exactly the element the store of ``out``
    writes: same dtype, shape and strides, no broadcast or transposed read; in a reduction
    kernel ``out`` must also walk the reduced dims (stored per element, in the final loop)."""
    plan = n.attrs.get("plan")
    if n.op != "kiln.fused" or not plan or n.body is None or plan.get("kind") not in PLACES.get(target, ()):
        return False
    a, b = inp.type, out.type
    if a is None or b is None or (a.shape, a.strides, a.dtype, a.offset) != (b.shape, b.strides, b.dtype, b.offset):
        return False
    maps, domain = plan["maps"], plan["domain"]
    nd = len(domain)
    if any(isinstance(md, (tuple, list)) for m in maps.values() for md in m):
        return False            # a reshaping group: its reads are not checked element by element here
    if {d for d in maps[out.name] if d is not None} != {i for i, s in enumerate(domain) if s != 1}:
        return False
    want = _full_strides(b, maps[out.name], nd)
    names = inner_names(n, inp.name)
    reads = 0
    for m in n.body.nodes:
        for x in m.inputs():
            if x.name not in names:
                continue
            om, oshape = maps[m.out.name], m.out.type.shape
            off = len(oshape) - a.rank
            dmap = [om[off + i] if a.shape[i] == oshape[off + i] and a.shape[i] != 1 else None
                    for i in range(a.rank)]
            if op_kind(m.op) != OpKind.POINTWISE or _full_strides(a, dmap, nd) != want:
                return False
            reads += 1
    return reads > 0


def matmul_elementwise_safe(n: Node, out, inp) -> bool:
    """Can output ``out`` of a kiln.matmul overwrite input ``inp``? When one epilogue group of it
    alone reads ``inp``, and reads it where it writes ``out`` (elementwise_safe on that group):
    every mode of the kernel (tiles, split-K's last pass, the GEMV, the TMA kernel, the pass
    after cuBLAS's product) loads a tile's elements in its epilogue before it stores them. A
    residual that dies at the product is then the output's buffer, and cuBLAS can add it as C
    in C += A @ B (codegen/matmul_launch.py)."""
    if n.op != "kiln.matmul" or n.body is None:
        return False
    inner = {b.name for b, a in zip(n.body.inputs, n.args) if getattr(a, "name", None) == inp.name}
    res = [b for b in n.body.inputs if b.name in inner]
    outs = [b for b, o in zip(n.body.outputs, n.outputs) if o.name == out.name]
    readers = [m for m in n.body.nodes if any(v.name in inner for v in m.inputs())]
    if len(res) != 1 or len(outs) != 1 or len(readers) != 1 or readers[0].op != "kiln.fused":
        return False
    grp = readers[0]
    pro = n.attrs.get("plan", {}).get("prologue")
    if (pro and pro.get("group") == grp.outputs[0].name) or not any(o.name == outs[0].name for o in grp.outputs):
        return False
    return elementwise_safe(grp, outs[0], res[0], "triton")


def writes_in_place(n: Node, out, inp, target: str) -> bool:
    """elementwise_safe for a fused kernel, matmul_elementwise_safe for a matmul's epilogue."""
    return elementwise_safe(n, out, inp, target) if n.op == "kiln.fused" else matmul_elementwise_safe(n, out, inp)


def reuse_in_place(g: Graph, bufs: dict, roots: dict[str, set[str]], target: str = "cpu"
                   ) -> tuple[dict[str, str], dict[str, str]]:
    """Merge each kernel output into the buffer of an input that dies at that kernel, where
    elementwise_safe allows; ``bufs`` (name -> Buffer) is updated. Returns (aliases: output ->
    buffer it reuses, overwrites: output -> input value it is written over)."""
    aliases: dict[str, str] = {}
    overwrites: dict[str, str] = {}
    home = lambda name: aliases.get(name, name)  # noqa: E731
    for i, n in enumerate(g.nodes):
        if n.op not in ("kiln.fused", "kiln.matmul"):
            continue
        taken: set[str] = set()
        ins = n.inputs()
        for v in n.outputs:
            if v.name not in bufs:
                continue
            for u in ins:
                r = home(u.name)
                if r in taken or r not in bufs or roots.get(u.name) != {u.name} or bufs[r].end != i \
                        or bufs[r].nbytes != bufs[v.name].nbytes:
                    continue
                if any(w is not u and r in {home(x) for x in roots.get(w.name, ())} for w in ins):
                    continue            # the kernel also reads this storage through another value
                if not writes_in_place(n, v, u, target):
                    continue
                bufs[r].end = bufs.pop(v.name).end
                aliases[v.name], overwrites[v.name] = r, u.name
                taken.add(r)
                break
    return aliases, overwrites


# ATen ops the functionalised graph spells out of place, and the in-place form the runtime calls
# when their first argument dies at them: the output is that argument, written over.
INPLACE_ATEN = {"aten.index_put.default": "aten.index_put_.default",
                "aten.index_add.default": "aten.index_add_.default",
                "aten.index_copy.default": "aten.index_copy_.default",
                "aten.scatter_add.default": "aten.scatter_add_.default",
                "aten.scatter.src": "aten.scatter_.src",
                "aten.scatter.value": "aten.scatter_.value"}


def dynamic_overwrites(g: Graph, overwrites: dict[str, str], target: str = "cpu") -> dict[str, str]:
    """``overwrites`` (the arena plan's) plus what dynamic mode, where every value is a tensor of
    its own, may also write in place: a kernel output (the graph's outputs too) over any input
    that is the whole of a tensor this graph made and dies at the kernel (elementwise_safe; a
    matmul's epilogue: matmul_elementwise_safe), not only over arena buffers; and an
    INPLACE_ATEN op's output over its first argument under the same conditions and of the same
    type (the runtime calls the in-place form). An embedding's gradient was its
    zero fill, the scattered copy of it, and their sum with the tied projection's gradient:
    three vocabulary-sized tensors live at once, now one."""
    from .memory import storage_lifetimes
    roots, born, last = storage_lifetimes(g)
    whole = set(born)           # values that are the whole of a storage this graph made
    out = dict(overwrites)
    taken = set(overwrites.values())

    def dies_here(u, i: int, n: Node) -> bool:
        return isinstance(u, Value) and u.name in whole and u.name not in taken and last.get(u.name) == i \
            and not any(u.name in roots.get(w.name, ()) for w in n.inputs() if w is not u)

    for i, n in enumerate(g.nodes):
        if n.op in ("kiln.fused", "kiln.matmul"):
            for v in n.outputs:
                if v.name in out:
                    continue
                u = next((u for u in n.inputs() if dies_here(u, i, n) and writes_in_place(n, v, u, target)), None)
                if u is not None:
                    out[v.name] = u.name
                    taken.add(u.name)
        elif n.op in INPLACE_ATEN and len(n.outputs) == 1 and "callable" not in n.attrs and n.args:
            x, t = n.args[0], n.out.type
            if dies_here(x, i, n) and x.type is not None and t is not None and (x.type.shape, x.type.strides,
                    x.type.dtype, x.type.offset, x.type.device) == (t.shape, t.strides, t.dtype, t.offset, t.device):
                out[n.out.name] = x.name
                taken.add(x.name)
    return out

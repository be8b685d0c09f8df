"""A compiled graph's steps as one generated Python function: values are locals, each step's
branch is decided when the source is written, launches and ATen calls are bound as constants.
The loop in CompiledGraph.run_list decides every step's kind and unpacks its description on
every call, and keeps values in a dict: on a tiny BERT layer (31 steps) on the CPU it cost about
2.7 us a step, more than a small kernel. Inductor runs its graphs the same way (a generated
wrapper). Steps whose cases are rare keep their helpers (a kept view that must be made again,
an ``out=`` call that fails, a kernel's first in-place launch)."""
from __future__ import annotations

import linecache
from typing import Any

from kiln.ir import Value
from .executor import KERNEL, OUT, SKIP, VIEW


class _Source:
    """Names for values and constants while the function is written."""

    def __init__(self):
        self.names: dict[str, str] = {}
        self.consts: list[Any] = []

    def var(self, name: str) -> str:
        got = self.names.get(name)
        if got is None:
            got = self.names[name] = f"v{len(self.names)}"
        return got

    def const(self, obj: Any) -> str:
        self.consts.append(obj)
        return f"C[{len(self.consts) - 1}]"

    def expr(self, obj: Any) -> str:
        """Python source that rebuilds ``obj`` with each Value read from its local (what
        executor.binder does against the value dict)."""
        if isinstance(obj, Value):
            return self.var(obj.name)
        if isinstance(obj, tuple):
            return "(" + "".join(self.expr(o) + ", " for o in obj) + ")"
        if isinstance(obj, list):
            return "[" + ", ".join(self.expr(o) for o in obj) + "]"
        if isinstance(obj, dict):
            return "{" + ", ".join(f"{self.expr(k)}: {self.expr(v)}" for k, v in obj.items()) + "}"
        if obj is None or isinstance(obj, (bool, int, str)):
            return repr(obj)
        return self.const(obj)

    def call_args(self, args, kwargs) -> str:
        """``f(*args, **kwargs)``'s argument list, spelled out."""
        parts = [self.expr(a) for a in args]
        for k, v in kwargs.items():
            parts.append(f"{k}={self.expr(v)}" if isinstance(k, str) and k.isidentifier()
                         else f"**{{{self.const(k)}: {self.expr(v)}}}")
        return ", ".join(parts)


def write(cg, views: dict, placeholders: dict, alloc):
    """``run(cg, inputs, consts, placeholders, first, views, device)`` for CompiledGraph ``cg``
    with the arena views ``views`` (one device's, kept between calls), the iota placeholders
    ``placeholders`` and ``alloc`` (how that device's outputs are allocated); and its source."""
    s = _Source()
    ind = "    "
    body: list[str] = []
    head = [f"{s.var(v.name)}," for v in cg.graph.inputs]
    for k, (mode, what, args, extra, outs, frees) in enumerate(cg._steps):
        L = body.append
        if mode is SKIP:
            pass
        elif mode is VIEW:
            src, dst = s.var(args), s.var(outs[0][0])
            kept, fn, ext = f"K[{k}]", s.const(what), s.const(extra)
            L(f"kp = {kept}")
            L(f"if kp is not None and kp[0] is {src} and (kp[1] is None or kp[1] == {src}.data_ptr()):")
            L(f"{ind}{dst} = kp[2]")
            L("else:")
            L(f"{ind}{dst} = cg._view({k}, {fn}, {src}, {ext}, views)")
        elif mode is KERNEL:
            res = []
            for j, (name, shape, strides, dtype) in enumerate(outs):
                o = f"o{j}"
                if extra and not views:
                    src = extra.get(name)
                    x = s.var(src) if src is not None else "None"
                    L(f"{o} = cg._in_place_tensor({x}, {s.const(outs[j])}, device)")
                elif name in views:
                    L(f"{o} = {s.const(views[name])}")
                else:
                    L(f"{o} = alloc({s.const(shape)}, {s.const(strides)}, dtype={s.const(dtype)}, device=device)")
                res.append(o)
            vals = "[" + ", ".join(s.var(a) for a in args) + "]"
            if k in cg._host_args:
                vals = f"cg._kernel_vals({k}, {s.const(list(args))}, {vals}, device)"
            rl = "[" + ", ".join(res) + "]"
            kern = s.const(what)
            if res:
                L(f"if {res[0]}.numel() > 0:")
                if extra:
                    L(f"{ind}if first:")
                    L(f"{ind}{ind}cg._launch_aside({kern}, {vals}, {rl})")
                    L(f"{ind}else:")
                    L(f"{ind}{ind}g = {kern}.launch({vals}, {rl})")
                    L(f"{ind}{ind}if g is not None:")
                    L(f"{ind}{ind}{ind}{', '.join(res)}, = cg._bind({s.const(outs)}, {rl}, g, views)")
                else:
                    L(f"{ind}g = {kern}.launch({vals}, {rl})")
                    L(f"{ind}if g is not None:")
                    L(f"{ind}{ind}{', '.join(res)}, = cg._bind({s.const(outs)}, {rl}, g, views)")
                L("g = None")
            for j, (name, *_r) in enumerate(outs):
                L(f"{s.var(name)} = {res[j]}")
            if res:
                L(f"{', '.join(res)} = {', '.join('None' for _ in res)}")
        elif mode is OUT:
            node, fn = what
            name = outs[0][0]
            call = s.call_args(node.args, node.kwargs)
            fallback = f"cg._out_failed({k}, {s.expr(tuple(node.args))}, {s.expr(dict(node.kwargs))})"
            if name in views:
                L("try:")
                L(f"{ind}{s.var(name)} = {s.const(fn)}({call}{', ' if call else ''}out={s.const(views[name])})")
                L("except (RuntimeError, TypeError):")
                L(f"{ind}{s.var(name)} = {fallback}")
            else:
                L(f"{s.var(name)} = {fallback}")
        else:                                       # ATEN
            node, fn, cloning = what
            call = s.call_args(node.args, node.kwargs)
            if len(outs) == 1 and not cloning:
                L(f"{s.var(outs[0][0])} = {s.const(fn)}({call})")
            else:
                a = s.expr(tuple(node.args))
                kw = s.expr(dict(node.kwargs))
                L(f"r = cg._call_aten({s.const(what)}, {a}, {kw}, {len(outs)})")
                for j, (name, *_r) in enumerate(outs):
                    L(f"{s.var(name)} = r[{j}] if len(r) > {j} else None")
                L("r = None")
        if frees:
            L(", ".join(s.var(n) for n in frees) + " = " + ", ".join("None" for _ in frees))
    out_expr = s.expr(list(cg.graph.outputs))
    lines = ["def run(cg, inputs, consts, placeholders, first, views, device):"]
    if head:
        lines.append(f"{ind}{' '.join(head)} = inputs")
    lines.append(f"{ind}inputs.clear()")
    for name in cg._consts:
        if name in s.names:
            lines.append(f"{ind}{s.names[name]} = consts[{name!r}]")
    for name in placeholders:
        if name in s.names:
            lines.append(f"{ind}{s.names[name]} = placeholders[{name!r}]")
    lines += [ind + line for line in body]
    lines.append(f"{ind}return {out_expr}")
    src = "\n".join(lines) + "\n"
    # nothing here refers back to cg (a cycle would keep a dropped graph's arena until the
    # cyclic collector ran): it comes in as an argument
    env = {"C": s.consts, "K": cg._kept, "alloc": alloc}
    filename = f"<kiln graph {id(cg):x}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)   # tracebacks show the step
    exec(compile(src, filename, "exec"), env)
    return env["run"], src

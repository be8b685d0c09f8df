"""CompiledGraph: runs a planned, fused graph. Steps are kernel launches (kiln.fused nodes),
ATen calls (everything else) and frees; kernel outputs that do not escape live in one arena, as
do matmul outputs (through out=). A kernel output the plan puts in place of an input gets a view
of the same arena bytes."""
from __future__ import annotations

import os
import weakref
from typing import Any

import torch

from kiln.ir import Graph, OpKind, Value, iter_values, op_kind
from kiln.ir.ops import is_kernel_op, resolve, run as run_aten
from kiln.passes.inplace import INPLACE_ATEN
from kiln.passes.memory import MemoryPlan, out_variant
from .host_alloc import empty_strided

KERNEL, OUT, ATEN, VIEW, SKIP = "kernel", "out", "aten", "view", "skip"
# run the steps as one generated function (runtime/straight.py), or the loop below: None reads
# KILN_STRAIGHT (checked at the first call), True / False decide
STRAIGHT: bool | None = None
NO_VIEWS: dict = {}         # a graph without an arena (one object: the generated function is kept for it)


def straight_setting() -> bool:
    """KILN_STRAIGHT, checked: a misspelt value would otherwise silently pick one of the two."""
    value = os.environ.get("KILN_STRAIGHT", "1")
    if value not in ("0", "1"):
        raise ValueError(f"KILN_STRAIGHT={value!r}: use 1 (steps as one generated function, the default) "
                         "or 0 (the step loop)")
    return value == "1"


# ATen ops that copy the whole storage of their first argument to keep its strides
# (clone_preserve_strides): given a view of the arena or of the tier pool they would allocate
# that much. The runtime hands them a compact copy of a dense view first (same strides, so the
# same output type; as_strided_scatter is left alone: its offsets index the storage).
STORAGE_CLONING = frozenset({"aten.slice_scatter.default", "aten.select_scatter.default",
                             "aten.diagonal_scatter.default"})


AS_STRIDED = ("aten.as_strided.default", "aten.as_strided_scatter.default")


def _op_callable(node):
    """The callable of a node's op. ``as_strided``'s and ``as_strided_scatter``'s storage offset
    counts from the start of their source's storage as the IR types it; at run time the source
    may be a slice of the arena (or a view whose storage starts elsewhere), so the offset moves
    by the difference."""
    fn = resolve(node.op)
    src = node.args[0] if node.args else None
    if node.op not in AS_STRIDED or not isinstance(src, Value) or src.type is None:
        return fn
    base = src.type.offset

    def as_strided(x, size, stride, storage_offset=None):
        at = base if storage_offset is None else storage_offset
        return fn(x, size, stride, x.storage_offset() + at - base)

    def as_strided_scatter(x, src, size, stride, storage_offset=None):
        # ATen clones the whole storage under x (clone_preserve_strides) and writes src at the
        # offset counted from its start: under an arena slice that copied the arena and wrote
        # the arena's first elements (zero gradients for GPT-2's fused QKV in arena mode)
        if x.storage_offset() or x.untyped_storage().nbytes() > x.numel() * x.element_size():
            if is_non_overlapping_and_dense(x):
                x = x.clone()           # dense: keeps its strides, at offset 0 of its own storage
        at = base if storage_offset is None else storage_offset
        return fn(x, src, size, stride, x.storage_offset() + at - base)
    return as_strided if node.op == "aten.as_strided.default" else as_strided_scatter


def is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """The elements fill exactly numel() slots of memory, in some order of the dimensions."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def binder(obj: Any):
    """``env -> obj`` with every Value replaced by ``env[value.name]``, resolved once per step so
    a call walks no argument structure (map_values per step was a fifth of a small graph's host
    time). Flat tuples, the common case, become one comprehension over (is_value, item) pairs."""
    if isinstance(obj, Value):
        name = obj.name
        return lambda env: env[name]
    if isinstance(obj, (tuple, list)):
        if all(not isinstance(o, (tuple, list, dict)) for o in obj):
            items = [(isinstance(o, Value), o.name if isinstance(o, Value) else o) for o in obj]
            if not any(v for v, _ in items):
                return lambda env: obj
            if isinstance(obj, tuple):
                return lambda env: tuple([env[x] if v else x for v, x in items])
            return lambda env: [env[x] if v else x for v, x in items]
        parts = [binder(o) for o in obj]
        if isinstance(obj, tuple):
            return lambda env: tuple([p(env) for p in parts])
        return lambda env: [p(env) for p in parts]
    if isinstance(obj, dict):
        if not obj:
            return lambda env: obj
        parts = {k: binder(o) for k, o in obj.items()}
        return lambda env: {k: p(env) for k, p in parts.items()}
    return lambda env: obj


class InputError(ValueError):
    """Inputs do not match the signature the graph was compiled for."""


class CompiledGraph:
    def __init__(self, graph: Graph, kernels: dict, check_inputs: bool = False, transient_arena: bool = False):
        """``transient_arena``: take the arena from PyTorch's allocator at each call and give it
        back at the end (training: the forward's arena is free while the backward runs), at the
        cost of making the views every call; otherwise the arena is kept between calls."""
        self.graph = graph
        self.transient_arena = transient_arena
        self.kernels = kernels                      # node name (first output) -> Kernel
        self.plan: MemoryPlan = graph.meta.get("memory_plan") or MemoryPlan()
        self.check_inputs = check_inputs
        self._arena: dict[torch.device, torch.Tensor] = {}
        self._free_after = self._frees()
        self._views: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._resizable: dict[torch.device, bool] = {}     # transient arenas: see _release
        self._planned: list | None = None                   # (name, offset, bytes, type) of arena buffers
        self._consts = {v.name: graph.constants[v.name] for v in graph.constant_values}
        self._tiers = None
        if graph.meta.get("cache_schedule") is not None:    # weights visit the device as planned
            from kiln.runtime.tiers import TierRuntime
            self._tiers = TierRuntime(graph, graph.meta["cache_schedule"], self.plan.arena_bytes)
            self._consts = {k: v for k, v in self._consts.items() if k not in self._tiers.planned}
        self._iota_dtypes: set = set()          # dtypes of the placeholders for skipped aranges
        self._steps = self._prepare()
        self._host_args = self._host_tensor_args()
        self._placeholders: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._home = next((t.device for t in self._consts.values() if isinstance(t, torch.Tensor) and t.dim()), None)
        self._moved_consts: dict = {}
        self._input_names = [v.name for v in graph.inputs]
        self._kept: list = [None] * len(self._steps)       # VIEW steps: (source, its address, the view)
        self._seen: dict[int, weakref.ref] = {}             # VIEW steps over weights: the last source
        self._warm = False
        self._straight: dict = {}           # device -> (generated run function, the views it binds)

    def _frees(self) -> list[list[str]]:
        last: dict[str, int] = {}
        for i, n in enumerate(self.graph.nodes):
            for v in n.inputs():
                last[v.name] = i
        keep = {v.name for v in self.graph.output_values()}
        frees: list[list[str]] = [[] for _ in self.graph.nodes]
        for name, i in last.items():
            if name not in keep:
                frees[i].append(name)
        return frees

    def signature(self) -> list[str]:
        return [str(v.type) if v.type is not None else "scalar" for v in self.graph.inputs]

    def _check(self, inputs) -> None:
        if len(inputs) != len(self.graph.inputs):
            raise InputError(f"expected {len(self.graph.inputs)} inputs ({', '.join(self.signature())}), "
                             f"got {len(inputs)}")
        for i, (v, x) in enumerate(zip(self.graph.inputs, inputs)):
            t = v.type
            if t is None:
                continue
            if not isinstance(x, torch.Tensor):
                raise InputError(f"input {i}: expected a tensor {t}, got {type(x).__name__}")
            if tuple(x.shape) != t.shape or x.dtype != t.dtype:
                raise InputError(f"input {i}: expected {t}, got {str(x.dtype).removeprefix('torch.')}"
                                 f"[{','.join(map(str, x.shape))}]")

    def _arena_for(self, device: torch.device) -> torch.Tensor:
        a = self._arena.get(device)
        if a is None or a.numel() < self.plan.arena_bytes:
            a = torch.empty(self.plan.arena_bytes, dtype=torch.uint8, device=device)
            self._arena[device] = a
            self._views.pop(device, None)
        return a

    def _arena_views(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Typed views of the arena for every planned buffer, made once per device. A transient
        arena's storage gets its memory back here (see _release); where it cannot be resized
        the arena and its views are made every call."""
        views = self._views.get(device)
        if views is not None:
            st = self._arena[device].untyped_storage()
            if not self.transient_arena or st.nbytes():
                return views
            try:
                st.resize_(self.plan.arena_bytes)
                return views
            except RuntimeError:            # pinned since (see _release)
                self._drop(device)
        arena = self._arena_for(device)
        typed: dict[torch.dtype, torch.Tensor] = {}
        views = {}
        if self._planned is None:
            self._planned = [(v.name, b.offset, b.nbytes, v.type) for n in self.graph.nodes for v in n.outputs
                             if (b := self.plan.buffer_of(v.name)) is not None and b.offset >= 0]
        for name, offset, nbytes, t in self._planned:
            size = t.dtype.itemsize
            if offset % size or arena.numel() % size:
                views[name] = arena[offset: offset + nbytes].view(t.dtype).as_strided(t.shape, t.strides)
                continue
            base = typed.get(t.dtype)
            if base is None:
                base = typed[t.dtype] = arena.view(t.dtype)
            views[name] = base.as_strided(t.shape, t.strides, offset // size)
        if not self.transient_arena or self._resizable.get(device, True):
            self._views[device] = views
        return views

    def _release(self, device: torch.device) -> None:
        """A transient arena's memory goes back to the allocator at the end of each call. Its
        views are kept over the emptied storage and see the new memory once the next call
        resizes it back: making them took a tiny cross-entropy's CPU forward ~20 of its ~90 us.
        A storage something pinned (``Tensor.numpy()`` marks it unresizable; kiln's numba
        launches read tensors without it) is dropped and made again, views and all, each call."""
        if device in self._views:
            try:
                self._arena[device].untyped_storage().resize_(0)
                return
            except RuntimeError:
                pass
        self._drop(device)

    def _drop(self, device: torch.device) -> None:
        """Forget a transient arena whose storage cannot be resized: made again at every call."""
        self._resizable[device] = False
        self._views.pop(device, None)
        self._arena.pop(device, None)

    def _prepare(self) -> list:
        """Per node: what to call and where its arguments come from, resolved once. Modes:
        KERNEL launches a generated kernel; VIEW makes (or reuses, see _lasting) a view; OUT
        calls an ATen op's out= overload with its arena view (falling back to ATEN if that call
        fails); ATEN calls the op."""
        steps = []
        lasting = self._lasting()       # name -> how to tell at run time that its tensor lasts
        escaping = {v.name for v in self.graph.output_values()}
        skipped, unmade = self._iota_only()
        for i, (node, frees) in enumerate(zip(self.graph.nodes, self._free_after)):
            if i in skipped:
                steps.append((SKIP, None, None, None, [], frees))
                continue
            outs = [(v.name, v.type) for v in node.outputs]
            src = node.args[0] if node.args else None
            if isinstance(src, Value) and src.name in lasting and op_kind(node.op) == OpKind.VIEW \
                    and len(outs) == 1 and outs[0][0] not in escaping and "callable" not in node.attrs \
                    and not any(True for _ in iter_values((node.args[1:], node.kwargs))):
                lasting[outs[0][0]] = len(steps)
                steps.append((VIEW, _op_callable(node), src.name,
                              (tuple(node.args[1:]), dict(node.kwargs), lasting[src.name]), outs, frees))
            elif is_kernel_op(node.op):
                in_place = {v.name: self.plan.overwrites[v.name] for v in node.outputs
                            if v.name in self.plan.overwrites}      # output -> input it overwrites
                outs = [(v.name, v.type.shape, v.type.strides, v.type.dtype) for v in node.outputs]
                iota = {pos for pos, _ in node.attrs.get("iota", ())}
                args = [v.name if not (j in iota and v.name in unmade) else self._placeholder(v)
                        for j, v in enumerate(node.args)]
                steps.append((KERNEL, self.kernels[node.outputs[0].name], args, in_place, outs, frees))
            elif self.plan.buffer_of(outs[0][0]) is not None and out_variant(node.op) and len(outs) == 1:
                steps.append((OUT, (node, resolve(out_variant(node.op))), binder(node.args), binder(node.kwargs),
                              outs, frees))
            elif self.plan.mode == "dynamic" and node.op in INPLACE_ATEN and outs[0][0] in self.plan.overwrites:
                # its first argument dies here (inplace.dynamic_overwrites): written over, not copied
                steps.append((ATEN, (node, resolve(INPLACE_ATEN[node.op]), False), binder(node.args),
                              binder(node.kwargs), outs, frees))
            else:
                steps.append((ATEN, self._aten_call(node), binder(node.args), binder(node.kwargs), outs, frees))
        self._outputs = binder(list(self.graph.outputs))
        return steps

    def _iota_only(self) -> tuple[set[int], set[str]]:
        """Steps that make an arange (or a view of one) only for kernels that compute it from
        their index instead (passes/iota.py): they are not run, and the kernels get a one-element
        placeholder in its place (a cross-entropy's backward spares an ATen launch and a tensor
        of the vocabulary's size). Returns those steps' indices and the values they would make."""
        from kiln.passes.iota import VIEWS, _arange_node
        nodes, escaping = self.graph.nodes, {v.name for v in self.graph.output_values()}
        uses: dict[str, list[tuple[int, bool]]] = {}
        for i, n in enumerate(nodes):
            iota = {pos for pos, _ in n.attrs.get("iota", ())} if is_kernel_op(n.op) else set()
            for j, a in enumerate(n.args):
                if isinstance(a, Value):
                    uses.setdefault(a.name, []).append((i, j in iota))
            for a in iter_values(n.kwargs):
                uses.setdefault(a.name, []).append((i, False))
        out, unmade = set(), set()
        for i in range(len(nodes) - 1, -1, -1):
            n = nodes[i]
            if not (_arange_node(n) or n.op in VIEWS) or any(v.name in escaping for v in n.outputs):
                continue
            read = [u for v in n.outputs for u in uses.get(v.name, ())]
            if read and all(iota or j in out for j, iota in read):
                out.add(i)
                unmade.update(v.name for v in n.outputs)
        return out, unmade

    def _placeholder(self, v: Value) -> str:
        self._iota_dtypes.add(v.type.dtype)
        return f"<iota {v.type.dtype}>"

    def _placeholder_env(self, device: torch.device) -> dict[str, torch.Tensor]:
        got = self._placeholders.get(device)
        if got is None:
            got = self._placeholders[device] = {f"<iota {dt}>": torch.zeros(1, dtype=dt, device=device)
                                                for dt in self._iota_dtypes}
        return got

    def _host_tensor_args(self) -> dict[int, list[int]]:
        """Kernel step -> positions of its arguments that are CPU tensors while the kernel runs on a
        GPU: 0-d ones (eager takes a CPU scalar tensor next to CUDA operands, ``x * torch.tensor(2.0)``)
        and constants (a tensor made in the traced function under ``torch.set_default_device("cuda")``
        reached kiln on the CPU). A generated kernel would read them through a host pointer; they
        are copied to the device (constants once)."""
        types = {v.name: v.type for v in (*self.graph.inputs, *self.graph.constant_values)}
        types.update((v.name, v.type) for n in self.graph.nodes for v in n.outputs)
        moves = {}
        for k, (mode, what, args, *_rest) in enumerate(self._steps):
            if mode is KERNEL and what.target != "cpu":
                pos = [i for i, a in enumerate(args) if types.get(a) is not None and types[a].device == "cpu"
                       and (types[a].rank == 0 or a in self._consts)]
                if pos:
                    moves[k] = pos
        return moves

    def _kernel_args(self, k: int, args: list, env: dict, device: torch.device) -> list:
        return self._kernel_vals(k, args, [env[a] for a in args], device)

    def _kernel_vals(self, k: int, args: list, vals: list, device: torch.device) -> list:
        """``vals`` (kernel step ``k``'s arguments, named ``args``) with its host tensors on ``device``."""
        for i in self._host_args.get(k, ()):
            x = vals[i]
            if isinstance(x, torch.Tensor) and x.device != device:
                if args[i] in self._consts:
                    key = (args[i], device)
                    if key not in self._moved_consts:
                        self._moved_consts[key] = x.to(device)
                    vals[i] = self._moved_consts[key]
                else:
                    vals[i] = x.to(device, non_blocking=True)
        return vals

    def _lasting(self) -> dict[str, Any]:
        """Values whose tensor may be the same object, over the same memory, on every call, and
        how a VIEW step tells at run time that it is: graph constants and the module's weights
        (None: they are), the arena's values (their name: the tensor must be that arena view,
        not a fresh tensor from an ATen fallback; a transient arena's only while its views are
        kept), kept views (their step: the tensor must be that step's kept view). A view of one is made once and kept, guarded by the source's
        identity and address: ATen view calls were most of the steps of small graphs (a BERT
        layer: 28 of 39). Views that escape are made fresh: the caller owns what it gets."""
        if self._tiers is not None:
            return {}
        lasting: dict[str, Any] = dict.fromkeys(set(self._consts) | set(self.graph.meta.get("weight_inputs") or ()))
        lasting.update((v.name, v.name) for n in self.graph.nodes for v in n.outputs
                       if (b := self.plan.buffer_of(v.name)) is not None and b.offset >= 0)
        return lasting

    @staticmethod
    def _aten_call(node) -> tuple:
        """(node, the callable, whether it clones its first argument's whole storage), resolved once."""
        return node, node.attrs.get("callable") or _op_callable(node), node.op in STORAGE_CLONING

    def _run_out(self, k: int, views, env):
        """An ATen op writing into its arena view; on failure (a device or autograd mismatch)
        the step reverts to a plain ATen call for good."""
        _, (node, fn), args, kwargs, outs, frees = self._steps[k]
        view = views.get(outs[0][0])
        if view is not None:
            try:
                return fn(*args(env), **kwargs(env), out=view)
            except (RuntimeError, TypeError):
                pass
        return self._out_failed(k, args(env), kwargs(env))

    def _out_failed(self, k: int, a, kw):
        """OUT step ``k`` becomes a plain ATen call for good (and runs as one on ``a``, ``kw``)."""
        _, (node, fn), args, kwargs, outs, frees = self._steps[k]
        self._steps[k] = (ATEN, self._aten_call(node), args, kwargs, outs, frees)
        self._straight.clear()          # written with the old step
        return run_aten(node, a, kw)

    @staticmethod
    def _in_place_tensor(x, out, device):
        """The input tensor itself when it has the output's layout (``out``: name, shape, strides, dtype)."""
        _, shape, strides, dtype = out
        if isinstance(x, torch.Tensor) and x.dtype == dtype and x.stride() == strides \
                and tuple(x.shape) == shape and x.device == device:
            return x
        return empty_strided(shape, strides, dtype=dtype, device=device)

    def __call__(self, *inputs) -> list[Any]:
        return self.run_list(list(inputs))

    # The per-step helpers below hold their tensors in their own frames: a local of run_list
    # would keep the last ATen call's arguments alive until the next ATen step (a whole
    # activation, past its planned free, when kernels or kept views run in between).
    @staticmethod
    def _call_aten(what, a, kw, n_outs: int) -> list:
        _, fn, cloning = what
        if cloning and a and isinstance(a[0], torch.Tensor) \
                and a[0].untyped_storage().nbytes() > a[0].numel() * a[0].element_size() \
                and is_non_overlapping_and_dense(a[0]):
            a = (a[0].clone(),) + tuple(a[1:])      # dense: the copy keeps its strides
        r = fn(*a, **kw)
        return list(r) if isinstance(r, (tuple, list)) and n_outs != 1 else [r]

    def _view(self, k: int, what, x: torch.Tensor, extra, views) -> torch.Tensor:
        """A VIEW step: the kept view while its source is the same tensor at the same address;
        otherwise a new one, kept only if its source lasts (see _lasting)."""
        kept = self._kept[k]
        if kept is not None and kept[0] is x and (kept[1] is None or kept[1] == x.data_ptr()):
            return kept[2]
        v = what(x, *extra[0], **extra[1])
        how = extra[2]
        if how is None:         # a weight: kept once the same tensor came twice running, so a
            seen = self._seen.get(k)    # caller passing new weights each call has no old ones held
            lasts = seen is not None and seen() is x
            self._seen[k] = weakref.ref(x)
        else:       # an arena view (only while the views are kept: see _release), or a kept view
            lasts = (x is views.get(how) and views is self._views.get(x.device)) if isinstance(how, str) \
                else self._kept[how] is not None and self._kept[how][2] is x
        # reshape copies what it cannot view: a kept copy would go stale when the source is
        # written in place (an optimizer step on a weight)
        lasts = lasts and v.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        # a transient arena's storage moves between calls and its views follow it: no address check
        at = None if how is not None and self.transient_arena else x.data_ptr()
        self._kept[k] = (x, at, v) if lasts else None
        return v

    @staticmethod
    def _launch_aside(what, args: list, res: list) -> None:
        """Launches into scratch outputs and copies them over: a kernel that overwrites an input
        must not write it twice when its first launch autotunes (re-runs) it."""
        tmp = [torch.empty_like(r) for r in res]
        got = what.launch(args, tmp)
        for r, t in zip(res, got or tmp):
            r.copy_(t)

    @staticmethod
    def _bind(outs, res: list, got: list, views: dict) -> list:
        """A kernel returned the tensors holding its results (ATen's attention allocates its own):
        they take the planned outputs' place, except an arena buffer, which must hold its bytes."""
        for i, ((name, *_), g) in enumerate(zip(outs, got)):
            if g is not res[i]:
                if name in views:
                    res[i].copy_(g)
                else:
                    res[i] = g
        return res

    def run_list(self, inputs: list) -> list[Any]:
        """Runs the graph and empties ``inputs`` once read (AOTAutograd's boxed convention): an
        input the caller no longer holds, such as a backward's saved activation, is freed at its
        last use here rather than after the whole graph."""
        if self.check_inputs:
            self._check(inputs)
        straight = STRAIGHT if STRAIGHT is not None else straight_setting()
        env: dict[str, Any] = dict(self._consts)
        env.update(zip(self._input_names, inputs))     # (a loop variable would keep the last input alive)
        # a 0-d CPU tensor next to CUDA inputs is a scalar, not where the graph runs
        device = next((x.device for x in inputs if isinstance(x, torch.Tensor) and (x.dim() or x.device.type != "cpu")),
                      None) or self._home or next((x.device for x in inputs if isinstance(x, torch.Tensor)),
                                                  torch.device("cpu"))
        alloc = empty_strided if device.type == "cpu" else torch.empty_strided   # huge pages: CPU only
        holders = self._placeholder_env(device) if self._iota_dtypes else {}
        env.update(holders)
        views = self._arena_views(device) if self.plan.arena_bytes else NO_VIEWS
        tiers = self._tiers
        if tiers is not None:
            tiers.begin(env, inputs, device, next(iter(views.values()), None))   # an arena view, if any
        try:
            first, self._warm = not self._warm, True
            # the steps as one generated function, where the views it binds are this device's
            # for good (not a tier schedule's, nor a transient arena's made again each call)
            if straight and tiers is None and (not views or views is self._views.get(device)):
                run = self._straight.get(device)
                if run is None or run[1] is not views:
                    from .straight import write
                    run = self._straight[device] = (write(self, views, holders, alloc)[0], views)
                env = None
                return run[0](self, inputs, self._consts, holders, first, views, device)
            inputs.clear()
            for k, (mode, what, args, extra, outs, frees) in enumerate(self._steps):
                if tiers is not None:
                    tiers.before(k, env)
                if mode is KERNEL:                  # extra: outputs written over inputs in place
                    if extra and not views:         # no arena: the output takes the input's tensor
                        res = [self._in_place_tensor(env.get(extra.get(o[0])), o, device) for o in outs]
                    else:
                        res = [views[name] if name in views else alloc(shape, strides, dtype=dtype, device=device)
                               for name, shape, strides, dtype in outs]
                    if res and res[0].numel() > 0:
                        vals = self._kernel_args(k, args, env, device) if k in self._host_args else [env[a] for a in args]
                        if extra and first:         # the first launch may autotune (re-run) the kernel
                            self._launch_aside(what, vals, res)
                        else:
                            got = what.launch(vals, res)
                            if got is not None:     # its own result tensors: bound, or copied into the arena
                                res = self._bind(outs, res, got, views)
                                got = None
                        vals = None
                elif mode is SKIP:                  # an arange only kernels compute themselves
                    res = ()
                elif mode is VIEW:                  # what: the view op, args: its source, extra: the rest
                    res = [self._view(k, what, env[args], extra, views)]
                elif mode is OUT:
                    res = [self._run_out(k, views, env)]
                else:
                    res = self._call_aten(what, args(env), extra(env), len(outs))
                for o, r in zip(outs, res):
                    env[o[0]] = r
                r = res = None      # no local may hold a tensor past its free (the next step may not rebind it)
                for name in frees:
                    env.pop(name, None)
                if tiers is not None:
                    tiers.after(k, env)
            if tiers is not None:
                tiers.end(env)
            return self._outputs(env)
        finally:
            if self.transient_arena and views:     # nothing escapes in the arena (memory plan)
                self._release(device)

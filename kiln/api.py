"""The front door: compile a captured graph, kiln.compile, and the torch.compile backend."""
from __future__ import annotations

import functools
import logging
import os
import time

import torch

from kiln.codegen import generate
from kiln.ir import Graph
from kiln.ir.capture import has_symbolic, dynamo_backend, from_fx, is_symbolic, retrace
from kiln.passes import run_pipeline
from kiln.runtime import CompiledGraph
from .options import Options
from .report import CompileReport, publish

_attention_log = logging.getLogger("kiln.attention")      # the attention rewrite's logger
_log = logging.getLogger("kiln")


def compile_graph(graph: Graph, options: Options, kind: str = "inference",
                  verify: bool | None = None) -> tuple[CompiledGraph, CompileReport]:
    """Passes, codegen and runtime for one captured graph; publishes its report. ``verify``
    (default: the KILN_VERIFY environment variable, set by the test suite) runs the IR verifier
    after every pass."""
    if verify is None:
        verify = os.environ.get("KILN_VERIFY", "0") not in ("", "0")
    # AOTAutograd calls its compilers inside FakeTensorMode; kiln computes on real tensors
    # (constant folding, masks known at compile time, tuning), so it runs outside any such mode.
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes():
        return _compile_graph(graph, options, kind, verify)


def _compile_graph(graph: Graph, options: Options, kind: str, verify: bool) -> tuple[CompiledGraph, CompileReport]:
    t0 = time.perf_counter()
    n_nodes = len(graph.nodes)
    target = options.resolved_target()
    g, timings = run_pipeline(graph, options, verify=verify)
    t1 = time.perf_counter()
    kernels = generate(g, target, options.cache_dir, bool(options.autotune))
    timings.append({"name": "codegen", "ms": (time.perf_counter() - t1) * 1e3})
    tuning_s = 0.0
    if options.autotune and target in ("triton", "cuda") and torch.cuda.is_available():
        from kiln.codegen.tuning import tune_kernels
        t2 = time.perf_counter()
        tuning_s = tune_kernels(g, kernels)
        timings.append({"name": "autotune", "ms": (time.perf_counter() - t2) * 1e3})
    compiled = CompiledGraph(g, kernels, transient_arena=kind != "inference")  # training: free between graphs
    # tier transfers sync with the host: no graph replay; nor for a training step under a memory
    # budget (replay keeps a graph's memory between calls)
    if options.cudagraphs and target in ("triton", "cuda") and torch.cuda.is_available() \
            and "cache_schedule" not in g.meta and (kind == "inference" or options.memory_budget is None):
        from kiln.runtime.cudagraphs import CudaGraphRunner
        compiled = CudaGraphRunner(compiled, policy="always" if options.cudagraphs is True else "auto",
                                   saved_from=g.meta.get("saved_from"), training=kind != "inference")
    report = make_report(g, kernels, n_nodes, timings, kind, target)
    report.compile_s = time.perf_counter() - t0
    report.tuning_s = tuning_s
    publish(report, options.report)
    return compiled, report


def make_report(g: Graph, kernels: dict, n_nodes: int, timings, kind: str, target: str) -> CompileReport:
    from kiln.ir import OpKind, op_kind
    from kiln.ir.ops import is_kernel_op
    entries, fallbacks = [], []
    for n in g.nodes:
        if is_kernel_op(n.op):
            k = kernels[n.outputs[0].name]
            entries.append({"name": k.name, "kind": k.kind, "target": k.target, "ops": list(k.ops)})
            continue
        kind_ = op_kind(n.op)
        if kind_ == OpKind.VIEW:
            continue                        # metadata only: no kernel runs
        ek = "matmul" if kind_ == OpKind.MATMUL else "extern"
        entries.append({"name": n.outputs[0].name if n.outputs else n.op, "kind": ek, "target": "aten",
                        "ops": [n.op]})
        if kind_ != OpKind.MATMUL and n.op not in fallbacks:
            fallbacks.append(n.op)
    plan = g.meta.get("memory_plan")
    # peak: the plan's estimate of the graph's own device storage at its fullest (arena + what
    # lives outside it, or every tensor freed at its last use in dynamic mode)
    peak = max(plan.peak_bytes, plan.device_bytes) if plan else 0
    mem = {"peak_bytes": peak, "arena_bytes": plan.arena_bytes if plan else 0,
           "per_tier": {"device": peak, "host": 0, "disk": 0}, "transfers_bytes": 0,
           "mode": plan.mode if plan else "arena"}
    sched = g.meta.get("cache_schedule")
    if sched is not None:           # weights visit the device: the device tier holds the pool too
        mem["per_tier"] = {"device": sched.sim["device_peak"], "host": sched.sim["peak"]["host"],
                           "disk": sched.sim["peak"]["disk"]}
        mem["transfers_bytes"] = sched.sim["transfer_bytes"]
        mem["tiers"] = {"planner": sched.planner, "budget": sched.budget, "pool_bytes": sched.pool_bytes,
                        "simulated_s": sched.sim["time_s"], "warmup_bytes": sched.sim["warmup_bytes"],
                        "spilled_bytes": sum(nb for _, _, nb, _ in sched.spills)}   # outputs sent to the host
    return CompileReport(graph_nodes=n_nodes, kernels=entries, fallback_ops=fallbacks, memory=mem,
                         passes=timings, graph_kind=kind, target=target)


class _ShapeSpecialized:
    """For graphs Dynamo hands over with symbolic shapes: compile once per concrete signature.
    The key is the sizes and strides of the inputs whose shapes are symbolic (the others are fixed
    under Dynamo's guards), so a model's parameters cost nothing per call. Past ``LIMIT``
    signatures, new ones run the ATen graph eagerly, as Dynamo runs a frame past its recompile
    limit (each compiled signature holds its own kernels and arena)."""
    LIMIT = 16

    def __init__(self, gm, options, kind, params=(), pair: dict | None = None):
        self.gm, self.options, self.kind = gm, options, kind
        self.params, self.pair = params, {} if pair is None else pair
        self.cache: dict = {}
        self.warned = False
        self.symbolic = [i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")
                         if has_symbolic(n.meta.get("val"))]

    def __call__(self, *args):
        return self.run_list(list(args))

    def run_list(self, args: list):
        """Boxed, as the graphs it compiles (capture.boxed): the list is emptied, so a backward
        frees each saved activation at its last use for every input shape too."""
        key = tuple((a.shape, a.stride()) if isinstance(a, torch.Tensor) else a
                    for a in (args[i] for i in self.symbolic))
        fn = self.cache.get(key)
        if fn is None:
            if len(self.cache) >= self.LIMIT:
                if not self.warned:
                    self.warned = True
                    _log.warning("kiln: a %s graph met %d input signatures; further ones run uncompiled",
                                 self.kind, self.LIMIT)
                owned = list(args)
                args.clear()
                return self.gm(*owned)
            gm = retrace(self.gm, list(args))
            g = from_fx(gm)
            names = self._names(g)
            mark_weight_inputs(g, self.kind, self.params, self.pair, names)
            fn, _ = compile_graph(g, self.options, self.kind)
            if self.kind == "forward":
                note_host_outputs(getattr(fn, "graph", g), self.pair, names)
            self.cache[key] = fn
        return fn.run_list(args)

    def _names(self, g: Graph) -> dict | None:
        """Retracing renames the placeholders (argN_1) and may rename outputs: AOTAutograd's names,
        which pair a forward's saved outputs with its backward's inputs, are the symbolic graph's,
        at the same positions. Retraced name -> original name (None if the counts differ)."""
        import torch.fx as fx
        nodes = list(self.gm.graph.nodes)
        if self.kind == "backward":
            orig, mine = [n.name for n in nodes if n.op == "placeholder"], [v.name for v in g.inputs]
        else:
            out = next(n for n in reversed(nodes) if n.op == "output").args[0]
            flat = out if isinstance(out, (list, tuple)) else [out]
            orig, mine = [a.name for a in flat if isinstance(a, fx.Node)], [v.name for v in g.output_values()]
        return dict(zip(mine, orig)) if len(orig) == len(mine) else None


def _compile_fx(gm, example_inputs, kind, options: Options, params=(), pair: dict | None = None):
    pair = {} if pair is None else pair
    if kind == "forward":       # read here: a symbolic graph's shapes compile outside AOTAutograd's context
        pair.setdefault("saved_from", _saved_from())
    if is_symbolic(gm):
        return _ShapeSpecialized(gm, options, kind, params, pair)
    g = from_fx(gm)
    mark_weight_inputs(g, kind, params, pair)
    compiled, _ = compile_graph(g, options, kind)
    if kind == "forward":
        note_host_outputs(getattr(compiled, "graph", g), pair)
    return compiled


def mark_weight_inputs(g: Graph, kind: str, params=(), pair: dict | None = None, names: dict | None = None) -> None:
    """``g.meta['weight_inputs']``: the inputs that are weights, which the tier planner may keep
    off the device. Forward and inference graphs: the module's parameters. A backward graph reads
    the weights as saved tensors (a parameter or a view of it, such as its transpose) that the
    forward of the same ``pair`` returned; their names carry over from the forward's outputs.
    A training forward also hands what it saves for the backward to the host tier under a
    budget (``meta['spill_outputs']``; see note_host_outputs), and the backward plans those
    saved tensors (``meta['host_inputs']``) like weights: on the device only when read.
    ``names``: AOTAutograd's names for this graph's outputs (forward) or inputs (backward) where
    they differ (a retraced graph)."""
    pair = {} if pair is None else pair
    g.meta["graph_kind"] = kind                 # named in budget errors (a training step has two graphs)
    if kind != "backward":
        g.meta["weight_inputs"] = _parameter_inputs(g, params)
        if kind == "forward":
            from kiln.passes.tiers import weight_views
            types = {v.name: v.type for v in g.output_values()}
            pair["weight_views"] = {(names or {}).get(name, name): types[name] for name in weight_views(g)}
            g.meta["spill_outputs"] = True
            g.meta["saved_from"] = pair.get("saved_from")
    else:
        saved, host = pair.get("weight_views", {}), pair.get("host_outputs", {})
        key = lambda v: (names or {}).get(v.name, v.name)  # noqa: E731
        g.meta["weight_inputs"] = [v.name for v in g.inputs if saved.get(key(v), False) == v.type]
        g.meta["host_inputs"] = [v.name for v in g.inputs if host.get(key(v), False) == v.type]


def note_host_outputs(g: Graph, pair: dict, names: dict | None = None) -> None:
    """After a training forward compiles: which of its outputs its tier schedule hands to the
    host tier (the backward receives them there, under the same names)."""
    sched = g.meta.get("cache_schedule")
    spilled = {x for _, _, _, xs in (sched.spills if sched is not None else ()) for x in xs}
    pair["host_outputs"] = {(names or {}).get(v.name, v.name): v.type for v in g.output_values() if v.name in spilled}


def captured_graphs(run) -> list[tuple[str, Graph]]:
    """The (kind, Graph) pairs Dynamo and AOTAutograd hand a backend while ``run(backend)`` runs
    a model through ``torch.compile(..., backend=backend)``; each graph has its parameter inputs
    as ``weight_inputs`` and runs uncompiled. For studying passes and planners on real models."""
    graphs: list[tuple[str, Graph]] = []

    def backend(gm, ex):
        params = [i for i, x in enumerate(ex) if isinstance(x, torch.nn.Parameter)]

        def keep(fx, _, kind):
            g = from_fx(fx)
            g.meta["weight_inputs"] = _parameter_inputs(g, params)
            graphs.append((kind, g))
            return fx.forward
        return dynamo_backend(keep)(gm, ex)
    run(backend)
    return graphs


def _saved_from() -> int | None:
    """Where a training forward's outputs for its backward start (after the mutated inputs, the
    user's outputs and RNG offsets), from AOTAutograd's metadata; None outside its context."""
    ctx = torch._guards.TracingContext.try_get()
    meta = getattr(ctx, "fw_metadata", None)
    n = getattr(meta, "num_forward", None)
    return n if isinstance(n, int) else None


def _parameter_inputs(g: Graph, params=()) -> list[str]:
    """Names of graph inputs that are the module's parameters: AOTAutograd lifts them to inputs
    in Dynamo's order (``params``: their positions there) and lists static inputs in its metadata."""
    try:
        ctx = torch._guards.TracingContext.try_get()
        idx = set(ctx.fw_metadata.static_input_indices) if ctx is not None and ctx.fw_metadata is not None else set()
    except AttributeError:
        idx = set()
    return [g.inputs[i].name for i in sorted(idx | set(params)) if i < len(g.inputs)]


class FrozenInputGuard:
    """Runs the compiled graph while the buffers its attention rewrite read at compile time are
    unchanged (same storage, no in-place write since); otherwise the original graph, eagerly,
    with a one-time warning. Dynamo guards a buffer's identity, not its contents."""

    def __init__(self, compiled, original, frozen: list[tuple[int, int, int]]):
        self.compiled, self.original, self.frozen = compiled, original, frozen
        self.warned = False

    def __call__(self, *args):
        for i, ptr, version in self.frozen:
            t = args[i]
            if t.data_ptr() != ptr or t._version != version:
                if not self.warned:
                    self.warned = True
                    _attention_log.warning("kiln: a buffer the attention rewrite read at compile time "
                                           "(graph input %d) changed since; this graph now runs uncompiled", i)
                return self.original(*args)
        return self.compiled(*args)


def kiln_backend(gm, example_inputs, options=None, **kw):
    """The ``torch.compile(model, backend="kiln", options={...})`` entry point."""
    opts = Options.make(options, **kw)
    from kiln.passes.attention_fx import rewrite_fx
    params = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
    pair: dict = {"params": params}      # what this graph's forward tells its backward (weight views)

    frozen: list = []

    def rewrite(gm, ex):
        """AOTAutograd puts the graph module's own parameters and buffers (such as the masks
        the attention rewrite registers) before Dynamo's inputs: module state too, and they
        shift the parameters' positions."""
        gm = rewrite_fx(gm, ex)
        frozen.extend(getattr(gm, "kiln_frozen_inputs", ()))
        lifted = len(dict(gm.named_parameters(remove_duplicate=False))) + \
            len(dict(gm.named_buffers(remove_duplicate=False)))
        pair["params"] = list(range(lifted)) + [lifted + i for i in params]
        return gm
    # Without a device budget, cheap activations are recomputed in the backward rather than
    # saved (lower training peaks). Under a budget saved activations can go to the host tier, while
    # recomputing them needs device working memory the budget may not have (a 30%-of-weights
    # budget fails to plan with recompute on), so the default partitioner stays.
    inner = dynamo_backend(lambda g, ex, kind: _compile_fx(g, ex, kind, opts, pair["params"], pair), rewrite=rewrite,
                           recompute=opts.memory_budget is None)
    compiled = inner(gm, example_inputs)
    if frozen:          # buffers read as constants (a causal mask): checked before every call
        return FrozenInputGuard(compiled, gm, frozen)
    return compiled


def compile(model_or_fn, example_inputs=None, **options):
    """Compile a module or function with kiln; returns a callable with eager's outputs.
    With ``example_inputs`` the compile happens now rather than on the first call."""
    opts = Options.make(None, **options)
    # dynamic=None, as torch.compile(backend="kiln") has it: a second shape makes Dynamo hand over a
    # symbolic graph, which kiln compiles per concrete shape (_ShapeSpecialized). dynamic=False
    # would patch Dynamo's config around every call (~3 us of host time per call on an H200 host).
    compiled = torch.compile(model_or_fn, backend=functools.partial(kiln_backend, options=opts))
    if example_inputs is not None:
        compiled(*example_inputs)
    return compiled

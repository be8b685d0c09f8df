"""Capture from PyTorch: an ATen-level FX graph (from AOTAutograd or torch.export, decomposed
with kiln's table) becomes a kiln Graph with full shape/dtype/stride metadata."""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from .decompose import decomposition_table
from .graph import Graph, Node, Value
from .ops import op_name
from .types import TensorType


def _type_of(val) -> TensorType | None:
    return TensorType.of(val) if isinstance(val, torch.Tensor) else None


def has_symbolic(val) -> bool:
    if isinstance(val, torch.SymInt | torch.SymFloat | torch.SymBool):
        return True
    if isinstance(val, torch.Tensor):
        return any(isinstance(s, torch.SymInt) for s in (*val.shape, *val.stride()))
    return False


def from_fx(gm: fx.GraphModule, constants: dict[str, torch.Tensor] | None = None) -> Graph:
    """Convert an ATen FX graph. ``constants`` maps placeholder names to tensors that become
    compile-time constants (weights); other placeholders become runtime inputs."""
    constants = constants or {}
    g = Graph()
    env: dict[fx.Node, Any] = {}

    def arg(a):
        return fx.node.map_arg(a, lambda n: env[n])

    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if n.op == "placeholder":
            v = Value(n.name, _type_of(val))
            if n.name in constants:
                g.constant_values.append(v)
                g.constants[n.name] = constants[n.name]
            else:
                g.inputs.append(v)
            env[n] = v
        elif n.op == "get_attr":
            t = getattr(gm, n.target)
            v = Value(n.name, TensorType.of(t) if isinstance(t, torch.Tensor) else None)
            g.constant_values.append(v)
            g.constants[n.name] = t
            env[n] = v
        elif n.op == "call_function" and n.target is operator.getitem and isinstance(env[n.args[0]], list):
            env[n] = env[n.args[0]][n.args[1]]
        elif n.op == "call_function":
            multi = isinstance(val, (tuple, list))
            vals = list(val) if multi else [val]
            outs = [Value(f"{n.name}_{i}" if multi else n.name, _type_of(x)) for i, x in enumerate(vals)]
            attrs = {}
            try:
                name = op_name(n.target)
            except TypeError:       # higher-order ops, python callables: opaque, run as-is
                name = f"py.{getattr(n.target, '__name__', type(n.target).__name__)}"
                attrs["callable"] = n.target
            g.nodes.append(Node(name, tuple(arg(n.args)), dict(arg(n.kwargs)), outs, attrs))
            env[n] = outs if multi else outs[0]
        elif n.op == "output":
            res = n.args[0]
            g.outputs = list(arg(res)) if isinstance(res, (tuple, list)) else [arg(res)]
        else:
            raise NotImplementedError(f"FX node kind {n.op!r} ({n.format_node()})")
    return g


def is_symbolic(gm: fx.GraphModule) -> bool:
    return any(has_symbolic(n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder")


def retrace(gm: fx.GraphModule, args: list) -> fx.GraphModule:
    """Specialise a (possibly symbolic) ATen graph to concrete inputs."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        return make_fx(gm, decomposition_table=decomposition_table(), tracing_mode="real")(*fake)


def boxed(fn: Callable) -> Callable:
    """AOTAutograd's boxed calling convention: the callee owns the argument list. A compiled
    graph with ``run_list`` empties it, so the backward frees each saved activation at its last
    use (as eager autograd does) instead of holding them all to the end."""
    # looked up on the class: a wrapper forwarding attributes (CUDA graph replay) runs unboxed
    run_list = fn.run_list if hasattr(type(fn), "run_list") else None

    def call(args: list):
        if run_list is None:
            return fn(*args)
        owned = list(args)
        args.clear()
        return run_list(owned)
    call._boxed_call = True
    return call


def dynamo_backend(compile_graph: Callable[[fx.GraphModule, list, str], Callable],
                   rewrite: Callable[[fx.GraphModule, list], fx.GraphModule] | None = None,
                   recompute: bool = False):
    """A torch.compile backend: Dynamo graph -> AOTAutograd (forward and backward, decomposed)
    -> ``compile_graph(aten_gm, example_inputs, 'forward'|'backward'|'inference')``.
    ``rewrite(gm, example_inputs)`` runs on the Dynamo graph before AOTAutograd: a pass that
    puts a custom op (with its own backward) in place of a pattern, such as attention.
    ``recompute``: split forward and backward with AOTAutograd's min-cut partitioner, which
    saves fewer activations and recomputes cheap pointwise ones in the backward (the default
    partitioner saves every forward value the backward reads: decomposed GELU's pieces too)."""
    from torch._dynamo.backends.common import aot_autograd

    def wrap(kind):
        # AOTAutograd calls the forward compiler under no_grad, so grad mode says nothing here:
        # inference graphs arrive through inference_compiler
        def compiler(gm, example_inputs):
            return boxed(compile_graph(gm, example_inputs, kind))
        return compiler

    extra = {}
    if recompute:
        from torch._functorch.partitioners import min_cut_rematerialization_partition
        extra["partition_fn"] = min_cut_rematerialization_partition
    backend = aot_autograd(fw_compiler=wrap("forward"), bw_compiler=wrap("backward"),
                           inference_compiler=wrap("inference"),
                           decompositions=decomposition_table(), **extra)
    if rewrite is None:
        return backend
    return lambda gm, example_inputs: backend(rewrite(gm, example_inputs), example_inputs)


def capture_export(model: torch.nn.Module, example_inputs: tuple) -> Graph:
    """Ahead-of-time capture through torch.export: weights become constants of the graph."""
    from torch.export import export
    from torch.export.graph_signature import InputKind
    ep = export(model, tuple(example_inputs), strict=False).run_decompositions(decomposition_table())
    consts: dict[str, torch.Tensor] = {}
    state = {**ep.state_dict, **ep.constants}
    for spec in ep.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            consts[spec.arg.name] = state[spec.target].detach()
    _refuse_state(ep)
    g = from_fx(ep.graph_module, consts)
    n_user = len(ep.graph_signature.user_outputs)
    g.outputs = g.outputs[len(g.outputs) - n_user:]
    return g


class StatefulModelError(ValueError):
    """The model writes its buffers or inputs in place, which an artifact cannot carry over."""


def _refuse_state(ep) -> None:
    """An artifact's weights are constants: a forward that writes a buffer (a counter, a KV cache)
    or an input in place would lose the write and give eager's first answer on every later call
    (a call counter's ``x * n`` stayed ``x * 1``). Refused, naming the first such write."""
    from torch.export.graph_signature import InputKind, OutputKind
    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    instead = "compile it with kiln.compile or torch.compile(model, backend='kiln'), which keep eager's semantics"
    for spec in ep.graph_signature.output_specs:
        if spec.kind in (OutputKind.BUFFER_MUTATION, OutputKind.PARAMETER_MUTATION):
            kind = "buffer" if spec.kind == OutputKind.BUFFER_MUTATION else "parameter"
            raise StatefulModelError(
                f"forward writes {kind} {spec.target!r} in place, and an ahead-of-time artifact keeps no "
                f"state between calls (each would start from the compiled values); {instead}")
        if spec.kind == OutputKind.USER_INPUT_MUTATION:
            i = user.index(spec.target) if spec.target in user else spec.target
            raise StatefulModelError(
                f"forward writes its input {i} in place, which an ahead-of-time artifact would not do to "
                f"the caller's tensor; {instead}")

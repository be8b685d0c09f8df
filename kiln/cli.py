"""The ``kiln`` command line: compile, run, explain, demo, bench.

Errors print one line, ``kiln: error: ...``, on stderr and exit with status 1 (2 for usage
errors); ``--debug`` shows the full traceback instead."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from .options import PLANNERS, QUANTIZE, TARGETS

SECTIONS = ("ir", "groups", "plan", "kernels")


# ---- commands ----------------------------------------------------------------------------------
def _options(args) -> "Options":  # noqa: F821
    from .options import Options
    kw = {"target": args.target}
    if getattr(args, "memory_budget", None) is not None:
        kw["memory_budget"] = args.memory_budget
    if getattr(args, "quantize", None) is not None:
        kw["quantize"] = args.quantize
    if getattr(args, "planner", None) is not None:
        kw["planner"] = args.planner
    if getattr(args, "report", None) is not None:
        kw["report"] = args.report
    if getattr(args, "cache_dir", None) is not None:
        kw["cache_dir"] = args.cache_dir
    return Options.make(None, **kw)


def cmd_compile(args) -> int:
    from kiln.runtime import save
    from .aot import compile_ahead, load_spec

    opts = _options(args)           # validate options before importing the user's model
    model, inputs = load_spec(args.spec)
    compiled, report = compile_ahead(model, inputs, opts)
    path = save(compiled, args.output, signature_note=f"kiln compile {args.spec}", target=report.target)
    print(report.summary())
    print(f"inputs: {', '.join(compiled.signature()) or '(none)'}")
    print(f"wrote {path}")
    return 0


def _load_inputs(path: str) -> tuple:
    import torch
    if not os.path.isfile(path):
        raise FileNotFoundError(f"inputs file {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                     # noqa: BLE001 - pickle/zip errors of all kinds
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read inputs from {path}: {msg}") from e
    if isinstance(obj, torch.Tensor):
        return (obj,)
    if isinstance(obj, (tuple, list)):
        return tuple(obj)
    raise ValueError(f"{path} must hold a torch.save'd tuple of inputs, got {type(obj).__name__}")


def cmd_run(args) -> int:
    import torch
    from kiln.runtime import load

    compiled = load(args.artifact)
    inputs = _load_inputs(args.inputs)
    dev = "cuda" if getattr(compiled, "manifest", {}).get("device") == "cuda" else None
    if dev:
        inputs = tuple(x.to(dev) if isinstance(x, torch.Tensor) else x for x in inputs)
    with torch.no_grad():
        outputs = compiled(*inputs)
    outputs = tuple(o.cpu() if isinstance(o, torch.Tensor) else o for o in outputs)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    torch.save(outputs, args.output)
    print(f"ran {args.artifact}: {len(inputs)} inputs -> {len(outputs)} outputs, wrote {args.output}")
    return 0


def _fused_groups(graph, kernels) -> list[tuple[str, str, int, list[str]]]:
    """(kernel name, kind, number of IR nodes, distinct op names) per kiln.fused node."""
    groups = []
    for n in graph.nodes:
        if n.op != "kiln.fused":
            continue
        name = n.outputs[0].name
        k = kernels.get(name)
        kind = getattr(k, "kind", None) or n.attrs.get("kind") or "?"
        body_ops = [m.op for m in (n.body.nodes if n.body else [])]
        ops = list(k.ops) if k is not None else list(dict.fromkeys(body_ops))
        groups.append((getattr(k, "name", name), kind, len(body_ops), ops))
    return groups


def explain(graph, kernels, sections=SECTIONS, out=None) -> None:
    """Print the IR after passes, the fusion groups, the memory plan and the kernel sources."""
    out = out or sys.stdout
    if "ir" in sections:
        print("== IR after passes ==", file=out)
        print(str(graph).rstrip(), file=out)
        print(file=out)
    if "groups" in sections:
        groups = _fused_groups(graph, kernels)
        print(f"== fusion groups ({len(groups)}) ==", file=out)
        for name, kind, n_nodes, ops in groups:
            print(f"{name}: {kind}, {n_nodes} nodes: {', '.join(ops)}", file=out)
        if not groups:
            print("(none: every op runs as an ATen call)", file=out)
        print(file=out)
    if "plan" in sections:
        plan = graph.meta.get("memory_plan")
        print("== memory plan ==", file=out)
        if plan is None:
            print("(no plan)", file=out)
        else:
            bufs = plan.buffers if hasattr(plan, "buffers") else {}
            print(f"arena {plan.arena_bytes:,} B, peak live {plan.peak_bytes:,} B, {len(bufs)} planned buffers",
                  file=out)
            for b in sorted(bufs.values(), key=lambda b: (b.start, b.offset)):
                print(f"  {b.name}: offset {b.offset:,} size {b.nbytes:,} B, live steps {b.start}..{b.end}",
                      file=out)
        print(file=out)
    if "kernels" in sections:
        print(f"== kernels ({len(kernels)}) ==", file=out)
        for key, k in kernels.items():
            print(f"-- {k.name} ({k.kind}, {k.target}, entry {k.entry}) --", file=out)
            print(k.source.rstrip(), file=out)
            print(file=out)
        if not kernels:
            print("(none generated)", file=out)


def cmd_explain(args) -> int:
    from kiln.runtime import load
    from .aot import compile_ahead, load_spec

    sections = tuple(s for s in SECTIONS if getattr(args, s)) or (() if args.memory else SECTIONS)
    if os.path.isdir(args.what):
        compiled = load(args.what)
    else:
        opts = _options(args)
        model, inputs = load_spec(args.what)
        compiled, _ = compile_ahead(model, inputs, opts)
    explain(compiled.graph, compiled.kernels, sections)
    if args.memory:
        from .memory_plot import describe, draw
        sched = compiled.graph.meta.get("cache_schedule")
        if sched is None:
            raise ValueError("--memory needs a tier plan: give --memory-budget (the device tier's capacity)")
        if isinstance(sched, dict):
            from kiln.passes.cache_schedule import CacheSchedule
            sched = CacheSchedule.from_dict(sched)
        print("== tiers ==")
        print(describe(sched))
        draw(sched, args.memory)
        print(f"wrote {args.memory}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run
    return run(target=args.target, steps=args.steps, small=args.small)


def _bench_suite():
    """bench/suite.py of the source checkout this kiln runs from (the suite is not installed)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "suite.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"kiln bench needs the source checkout's bench/ folder; {path} not found")
    mod = sys.modules.get("kiln_bench_suite")
    if mod is None:
        spec = importlib.util.spec_from_file_location("kiln_bench_suite", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["kiln_bench_suite"] = mod
        spec.loader.exec_module(mod)
    return mod


def cmd_bench(args) -> int:
    import torch
    if not args.cpu and not torch.cuda.is_available():
        raise ValueError("kiln bench: the GPU cases need a CUDA GPU and none is available; "
                         "use --cpu for the small CPU cases")
    _bench_suite().run(args.cases, cpu=args.cpu, autotune=args.autotune, json_path=args.json,
                       markdown_path=args.markdown, chart_path=args.chart, command=args.command_line)
    return 0


# ---- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks on errors")

    p = argparse.ArgumentParser(prog="kiln", description="kiln: a compiler toolchain for PyTorch programs.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def target_arg(sp):
        sp.add_argument("--target", choices=TARGETS, default="auto",
                        help="code generation target (default: auto = triton on a GPU, cpu otherwise)")

    def compile_args(sp):
        target_arg(sp)
        sp.add_argument("--memory-budget", metavar="BYTES",
                        help="device-tier capacity the memory plan must fit, e.g. 6GiB, 512MB or bytes")
        sp.add_argument("--quantize", choices=[q for q in QUANTIZE if q is not None],
                        help="weight quantization layout (default: none)")
        sp.add_argument("--planner", choices=PLANNERS, help="tier planner (default: greedy)")
        sp.add_argument("--cache-dir", metavar="DIR", help="kernel cache directory")

    c = sub.add_parser("compile", parents=[common], help="compile a model ahead of time into an artifact",
                       description="Compile SPEC ahead of time and write an artifact directory that "
                                   "'kiln run' loads without recompiling.")
    c.add_argument("spec", metavar="SPEC",
                   help="path/to/file.py:factory or package.module:factory; the factory returns "
                        "(model, example_inputs)")
    c.add_argument("-o", "--output", required=True, metavar="DIR", help="artifact directory to write")
    compile_args(c)
    c.add_argument("--report", metavar="PATH", help="append the compile report as a JSON line to PATH")
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run", parents=[common], help="run a compiled artifact on saved inputs",
                       description="Load an artifact (no recompilation) and run it on the inputs in "
                                   "IN.pt (a torch.save'd tuple); the outputs are saved as a tuple.")
    r.add_argument("artifact", metavar="DIR", help="artifact directory written by 'kiln compile'")
    r.add_argument("--inputs", required=True, metavar="IN.pt", help="torch.save'd tuple of inputs")
    r.add_argument("--output", required=True, metavar="OUT.pt", help="where to torch.save the outputs tuple")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("explain", parents=[common], help="show the IR, fusion groups, memory plan and kernels",
                       description="Explain what kiln does with a model (SPEC, compiled now) or an "
                                   "artifact (DIR). Without section flags every section is printed.")
    e.add_argument("what", metavar="SPEC|DIR", help="a model spec (file.py:factory) or an artifact directory")
    e.add_argument("--ir", action="store_true", help="the IR after passes")
    e.add_argument("--groups", action="store_true", help="the fusion groups (kind and ops)")
    e.add_argument("--plan", action="store_true", help="the memory plan")
    e.add_argument("--kernels", action="store_true", help="the generated kernel sources")
    e.add_argument("--memory", metavar="PLOT.png",
                   help="with --memory-budget: summarise the tier plan and draw each tier's occupancy "
                        "and the transfers over time into PLOT.png (needs matplotlib)")
    compile_args(e)
    e.set_defaults(func=cmd_explain)

    d = sub.add_parser("demo", parents=[common], help="compile a small built-in transformer, check and time it",
                       description="Compile a built-in 2-block transformer with kiln, check its "
                                   "outputs against eager PyTorch and time both.")
    target_arg(d)
    d.add_argument("--steps", type=_positive_int, default=10, help="timed runs per side (default 10)")
    d.add_argument("--small", action="store_true", help="a smaller model (quick check)")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", parents=[common], help="benchmark eager, TorchInductor and kiln on micro and model cases",
                       description="Time eager PyTorch, TorchInductor and kiln in one process on micro cases "
                                   "(fused pointwise/norm kernels) and model cases (Llama layer, GPT-2 block, "
                                   "BERT layer, SwiGLU MLP, Llama decode step), with each case's roofline "
                                   "(bytes / measured copy bandwidth or FLOPs / measured matmul peak), "
                                   "kiln's error against eager and geometric-mean speed-ups. Needs the source "
                                   "checkout's bench/ folder; model cases need transformers.")
    b.add_argument("--cases", nargs="+", metavar="CASE",
                   help="cases or groups (default: all; with --cpu: tiny). Cases: bias_gelu_residual, add_rmsnorm, "
                        "softmax, layernorm, llama_layer, gpt2_block, bert_layer, swiglu_mlp, llama_decode; "
                        "groups: micro, model, all, tiny")
    b.add_argument("--json", metavar="PATH", help="write the results as JSON")
    b.add_argument("--markdown", metavar="PATH", help="write the results as a markdown table")
    b.add_argument("--chart", metavar="PATH", help="write a bar chart PNG (needs matplotlib: pip install 'kiln[bench]')")
    b.add_argument("--autotune", action="store_true", help="kiln tunes its launch configs at compile time")
    b.add_argument("--cpu", action="store_true", help="small CPU cases (kiln target cpu), no GPU needed")
    b.set_defaults(func=cmd_bench)
    return p


def _positive_int(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return n


def _one_line(e: BaseException) -> str:
    from .aot import SpecError
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    if isinstance(e, (ValueError, SpecError, FileNotFoundError)) and msg:
        return msg
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:        # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    args.command_line = "kiln " + " ".join(sys.argv[1:] if argv is None else argv)
    if not args.debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except Exception as e:          # noqa: BLE001 - the CLI's one-line error contract
        if args.debug:
            raise
        sys.stdout.flush()
        print(f"kiln: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

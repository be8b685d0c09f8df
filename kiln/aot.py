"""Ahead-of-time compile: a model and example inputs -> a CompiledGraph (weights baked in as
constants) that ``kiln.runtime.save`` writes as an artifact. Also resolves CLI model specs."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

import torch

from kiln.runtime import CompiledGraph
from .options import Options
from .report import CompileReport


class SpecError(ValueError):
    """A model spec (``path/to/file.py:factory`` or ``package.module:factory``) is unusable."""


def compile_ahead(model, example_inputs, options: Options | dict | None = None
                  ) -> tuple[CompiledGraph, CompileReport]:
    """Capture ``model`` with torch.export (eval mode, no grad) and compile the inference graph.
    The result checks its inputs against the compiled signature."""
    from kiln.ir.capture import capture_export
    from .api import compile_graph

    opts = options if isinstance(options, Options) else Options.make(options)
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if isinstance(model, torch.nn.Module):
        was_training = model.training
        model.eval()
    else:
        was_training = None
        model = _FnModule(model)
    try:
        with torch.no_grad():
            graph = capture_export(model, example_inputs)
            compiled, report = compile_graph(graph, opts, kind="inference")
    finally:
        if was_training:
            model.train()
    compiled.check_inputs = True
    compiled.target = report.target
    return compiled, report


class _FnModule(torch.nn.Module):
    """Wrap a plain function so torch.export can capture it."""
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _load_file(path: str):
    if not os.path.isfile(path):
        raise SpecError(f"model spec: file {path!r} not found")
    name = "kiln_spec_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_").replace(".", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"model spec: cannot import {path!r} (not a Python file?)")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    d = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, d)                    # let the file import its siblings
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        sys.modules.pop(name, None)
        raise SpecError(f"model spec: importing {path!r} failed: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        if sys.path and sys.path[0] == d:
            sys.path.pop(0)
    return mod


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


def resolve_factory(spec: str):
    """The factory callable named by ``spec``."""
    if not isinstance(spec, str) or ":" not in spec:
        raise SpecError(f"model spec {spec!r}: expected 'path/to/file.py:factory' or 'package.module:factory'")
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise SpecError(f"model spec {spec!r}: expected 'path/to/file.py:factory' or 'package.module:factory'")
    if where.endswith(".py") or os.sep in where or "/" in where:
        mod = _load_file(where)
    else:
        try:
            mod = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise SpecError(f"model spec {spec!r}: no module named {e.name or where!r}") from e
        except Exception as e:
            raise SpecError(f"model spec {spec!r}: importing {where!r} failed: "
                            f"{type(e).__name__}: {_first_line(e)}") from e
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"model spec {spec!r}: {where!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError(f"model spec {spec!r}: {attr!r} is not callable")
    return obj


def load_spec(spec: str) -> tuple[Any, tuple]:
    """Resolve ``path/to/file.py:factory`` or ``package.module:factory`` and call the factory,
    which must return ``(model, example_inputs)``. Raises SpecError (one line) otherwise."""
    factory = resolve_factory(spec)
    try:
        res = factory()
    except Exception as e:
        raise SpecError(f"model spec {spec!r}: the factory raised {type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(res, (tuple, list)) or len(res) != 2:
        got = f"a {len(res)}-tuple" if isinstance(res, (tuple, list)) else type(res).__name__
        raise SpecError(f"model spec {spec!r}: the factory must return (model, example_inputs), got {got}")
    model, inputs = res
    if not callable(model):
        raise SpecError(f"model spec {spec!r}: the factory's model is not callable ({type(model).__name__})")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise SpecError(f"model spec {spec!r}: example_inputs must be a tuple of inputs, got {type(inputs).__name__}")
    return model, tuple(inputs)

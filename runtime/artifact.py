"""Artifacts on disk: a compiled graph saved by ``kiln compile`` and loaded by ``kiln run``
without recompiling (no capture, no passes, no code generation: kernel sources are stored and
their launchers are built lazily on first launch).

An artifact is a directory::

    manifest.json        format/kiln/torch/triton/python versions, target, device, input
                         signature, output count, sha256 of every other file
    graph.json           the graph after passes (kiln.ir.serialize), plus non-tensor constants
    kernels.json         every generated kernel (Kernel.to_dict, with its source)
    weights.safetensors  the graph's tensor constants (contiguous copies; layout restored on load)

``save`` writes into a temporary directory next to the target and renames it into place, so a
failed save never leaves a half-written artifact. ``load`` checks the manifest, the versions and
every checksum before it reads anything else, and raises :class:`ArtifactError` (a ValueError
with a one-line message) when something is wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from typing import Any

import torch

from .executor import CompiledGraph

__all__ = ["ArtifactError", "save", "load", "read_manifest", "FORMAT", "FORMAT_VERSION"]

FORMAT = "kiln.artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "graph.json"
KERNELS = "kernels.json"
WEIGHTS = "weights.safetensors"
_PAYLOAD = (GRAPH, KERNELS, WEIGHTS)
_NONTENSOR_KEY = "kiln_nontensor_constants"


class ArtifactError(ValueError):
    """A kiln artifact is missing, corrupt or incompatible with this kiln / this machine."""


# ---- helpers -----------------------------------------------------------------------------------
def _kiln_version() -> str:
    try:
        from importlib.metadata import version
        return version("kiln")
    except Exception:           # noqa: BLE001 - not installed as a distribution (source checkout)
        return "0.1.0"


def _triton_version() -> str | None:
    try:
        import triton
        return getattr(triton, "__version__", None)
    except Exception:           # noqa: BLE001 - any import failure means "no usable triton"
        return None


def _major(v: str) -> str:
    return str(v).split(".", 1)[0]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, allow_nan=False, indent=1)
        f.write("\n")


def _type_dict(t) -> dict:
    from kiln.ir import dtype_name
    return {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "strides": list(t.strides),
            "device": t.device}


def _graph_device(graph) -> str:
    """'cuda' if any input or constant of the graph lives on a CUDA device, else 'cpu'."""
    for v in graph.inputs + graph.constant_values:
        if v.type is not None and str(v.type.device).startswith("cuda"):
            return "cuda"
    return "cpu"


def _target_of(compiled: CompiledGraph, device: str) -> str:
    t = getattr(compiled, "target", None)
    if t:
        return t
    gen = [k.target for k in compiled.kernels.values() if getattr(k, "target", "aten") != "aten"]
    if gen:
        return gen[0]
    return "triton" if device == "cuda" else "cpu"


def _has_opaque(obj: Any) -> bool:
    if isinstance(obj, dict):
        return "$opaque" in obj or any(_has_opaque(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_opaque(v) for v in obj)
    return False


# ---- save --------------------------------------------------------------------------------------
def _write_payload(compiled: CompiledGraph, tmp: str) -> None:
    from safetensors.torch import save_file

    from kiln.ir import Graph
    from kiln.ir.serialize import graph_to_json

    g = compiled.graph
    gj = graph_to_json(g)
    for i, nd in enumerate(gj["graph"]["nodes"]):
        if nd["op"].startswith("kiln."):
            continue        # runs through its stored kernel; its body is documentation only
        if nd["op"].startswith("py.") or _has_opaque(nd.get("args")) or _has_opaque(nd.get("kwargs")):
            raise ArtifactError(f"cannot save: node {i} ({nd['op']}) holds a Python object with no "
                                "serialisable form; this graph can only run in the process that compiled it")

    tensors: dict[str, torch.Tensor] = {}
    other_names, other_vals = [], []
    for v in g.constant_values:
        c = g.constants[v.name]
        if isinstance(c, torch.Tensor):
            tensors[v.name] = c.detach().to("cpu").contiguous().clone()
        else:
            other_names.append(v.name)
            other_vals.append(c)
    if other_names:
        enc = graph_to_json(Graph(outputs=other_vals))
        if _has_opaque(enc["graph"]["outputs"]):
            raise ArtifactError(f"cannot save: a non-tensor constant among {', '.join(other_names)} "
                                "has no serialisable form")
        gj[_NONTENSOR_KEY] = {"names": other_names, "encoded": enc}
    _write_json(os.path.join(tmp, GRAPH), gj)

    kernels = {}
    for key, k in compiled.kernels.items():
        d = k.to_dict()
        try:
            json.dumps(d, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"cannot save: kernel {key} is not JSON-serialisable ({e})") from None
        kernels[key] = d
    _write_json(os.path.join(tmp, KERNELS), {"kernels": kernels})

    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": FORMAT})
    except OSError:
        raise
    except Exception as e:      # noqa: BLE001 - safetensors raises several types (dtype, sharing)
        raise ArtifactError(f"cannot save weights: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _manifest(compiled: CompiledGraph, tmp: str, note: str | None) -> dict:
    g = compiled.graph
    device = _graph_device(g)
    inputs = []
    for v in g.inputs:
        inputs.append({"name": v.name, **(_type_dict(v.type) if v.type is not None else {"kind": "scalar"})})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kiln_version": _kiln_version(),
        "torch_version": torch.__version__,
        "triton_version": _triton_version(),
        "python_version": platform.python_version(),
        "target": _target_of(compiled, device),
        "device": device,
        "inputs": inputs,
        "num_outputs": len(g.outputs),
        "num_kernels": len(compiled.kernels),
        "note": note,
        "files": {name: _sha256(os.path.join(tmp, name)) for name in _PAYLOAD},
    }


def _replace_dir(tmp: str, directory: str) -> None:
    """Move ``tmp`` to ``directory``; an existing artifact there is renamed away first and only
    deleted once the new one is in place (restored if the swap fails)."""
    if not os.path.lexists(directory):
        os.rename(tmp, directory)
        return
    parent, base = os.path.split(directory)
    old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
    os.rmdir(old)
    os.rename(directory, old)
    try:
        os.rename(tmp, directory)
    except BaseException:
        os.rename(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save(compiled: CompiledGraph, directory, *, signature_note: str | None = None,
         target: str | None = None) -> str:
    """Write ``compiled`` as an artifact directory; returns its absolute path.

    ``signature_note`` is free text stored in the manifest (e.g. the spec it was compiled from).
    ``target`` overrides the target recorded in the manifest (default: ``compiled.target`` if
    set, else inferred from the kernels and the graph's device). An existing artifact at
    ``directory`` is replaced; any other existing, non-empty path is refused.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.lexists(directory):
        if not os.path.isdir(directory) or os.path.islink(directory):
            raise ArtifactError(f"cannot save to {directory}: it exists and is not a directory")
        if os.listdir(directory) and not os.path.isfile(os.path.join(directory, MANIFEST)):
            raise ArtifactError(f"cannot save to {directory}: it is a non-empty directory that is "
                                "not a kiln artifact; choose another path")
    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        if target is not None:
            compiled.target = target
        _write_payload(compiled, tmp)
        _write_json(os.path.join(tmp, MANIFEST), _manifest(compiled, tmp, signature_note))
        os.chmod(tmp, 0o755 & ~_umask())
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# ---- load --------------------------------------------------------------------------------------
def _read_json(directory: str, name: str) -> Any:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise ArtifactError(f"not a complete kiln artifact: {path} is missing")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"corrupt artifact: {name} is not valid JSON ({str(e).splitlines()[0]})") from None


def read_manifest(directory) -> dict:
    """The artifact's manifest after checking format, versions and every file's checksum."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise ArtifactError(f"no kiln artifact at {directory}: it {what}")
    m = _read_json(directory, MANIFEST)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ArtifactError(f"not a kiln artifact: {os.path.join(directory, MANIFEST)} has no "
                            f"'format': '{FORMAT}'")
    fv = m.get("format_version")
    if fv != FORMAT_VERSION:
        raise ArtifactError(f"incompatible artifact: format version {fv!r}, this kiln reads version "
                            f"{FORMAT_VERSION}; recompile it with this kiln (kiln compile)")
    kv, mine = str(m.get("kiln_version", "?")), _kiln_version()
    if _major(kv) != _major(mine):
        raise ArtifactError(f"incompatible artifact: built by kiln {kv}, this is kiln {mine} (major "
                            "versions differ); recompile it with this kiln (kiln compile)")
    files = m.get("files")
    if not isinstance(files, dict) or any(name not in files for name in _PAYLOAD):
        raise ArtifactError(f"corrupt artifact: manifest.json does not list checksums for {', '.join(_PAYLOAD)}")
    for name, digest in files.items():
        if os.path.basename(name) != name:
            raise ArtifactError(f"corrupt artifact: manifest.json names a file outside the artifact ({name!r})")
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ArtifactError(f"not a complete kiln artifact: {path} is missing")
        if _sha256(path) != digest:
            raise ArtifactError(f"corrupt artifact: {name} checksum mismatch")
    return m


def _check_machine(m: dict) -> None:
    target, device = m.get("target"), m.get("device", "cpu")
    needs_gpu = device == "cuda" or target == "cuda"
    if needs_gpu and not torch.cuda.is_available():
        raise ArtifactError(f"artifact was compiled for target {target!r} on a CUDA device and this "
                            "machine has no GPU; recompile the model here with --target cpu")


def _restore_layout(values: torch.Tensor, t, device: str) -> torch.Tensor:
    """Rebuild a constant with the strides/offset its IR type records (kernels rely on them)."""
    values = values.to(device)
    shape, strides, offset = tuple(t.shape), tuple(t.strides), int(t.offset)
    if tuple(values.stride()) == strides and offset == 0 or values.numel() == 0:
        return values
    n = max(t.storage_bytes // t.itemsize, 1)
    base = torch.empty(n, dtype=values.dtype, device=device)
    out = base.as_strided(shape, strides, offset)
    try:
        out.copy_(values)
    except RuntimeError:        # overlapping layout (a stride of 0, say): scatter by index instead
        idx = torch.arange(n, device=device).as_strided(shape, strides, offset)
        base[idx.reshape(-1)] = values.reshape(-1)
    return out


def _memory_plan(d: Any):
    from kiln.passes.memory import MemoryPlan
    if d is None or isinstance(d, MemoryPlan):
        return d
    try:
        return MemoryPlan.from_dict(d)
    except (AttributeError, TypeError, ValueError) as e:
        raise ArtifactError(f"corrupt artifact: graph.json has a malformed memory plan ({e})") from None


def load(directory) -> CompiledGraph:
    """Load an artifact written by :func:`save`. The result runs without recompiling and checks
    its inputs against the compiled signature (raising runtime.InputError)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from kiln.codegen import Kernel
    from kiln.ir.serialize import graph_from_json

    directory = os.fspath(directory)
    m = read_manifest(directory)
    _check_machine(m)
    gj = _read_json(directory, GRAPH)
    kj = _read_json(directory, KERNELS)
    try:
        tensors = load_file(os.path.join(directory, WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"corrupt artifact: cannot read {WEIGHTS} ({str(e).splitlines()[0]})") from None

    # constant types come from the graph JSON; restore each tensor's layout and device from them
    try:
        decl = {c["name"]: c["type"] for c in gj["graph"]["constants"]}
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"corrupt artifact: graph.json has no valid constants list ({e})") from None
    constants: dict[str, Any] = dict(tensors)
    extra = gj.pop(_NONTENSOR_KEY, None) if isinstance(gj, dict) else None
    if extra:
        try:
            vals = graph_from_json(extra["encoded"]).outputs
            constants.update(zip(extra["names"], vals))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"corrupt artifact: bad non-tensor constants in graph.json ({e})") from None
    missing = [n for n in decl if n not in constants]
    if missing:
        raise ArtifactError(f"corrupt artifact: {WEIGHTS} lacks constant(s) {', '.join(missing[:5])}")
    try:
        g = graph_from_json(gj, constants)
    except ValueError as e:
        raise ArtifactError(f"corrupt artifact: {e}") from None
    for v in g.constant_values:
        c = g.constants[v.name]
        if isinstance(c, torch.Tensor) and v.type is not None:
            if tuple(c.shape) != tuple(v.type.shape) or c.dtype != v.type.dtype:
                raise ArtifactError(f"corrupt artifact: weight {v.name} is {c.dtype}{list(c.shape)}, "
                                    f"the graph expects {v.type}")
            g.constants[v.name] = _restore_layout(c, v.type, v.type.device)
    g.meta["memory_plan"] = _memory_plan(g.meta.get("memory_plan"))
    if g.meta["memory_plan"] is None:
        del g.meta["memory_plan"]

    try:
        kernels = {key: Kernel.from_dict(d) for key, d in kj["kernels"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"corrupt artifact: {KERNELS} is malformed ({e})") from None
    for n in g.nodes:
        if n.op.startswith("kiln.") and n.outputs[0].name not in kernels:
            raise ArtifactError(f"corrupt artifact: no kernel stored for fused node %{n.outputs[0].name}")

    compiled = CompiledGraph(g, kernels, check_inputs=True)
    compiled.target = m.get("target")
    compiled.manifest = m
    compiled.artifact_dir = os.path.abspath(directory)
    return compiled

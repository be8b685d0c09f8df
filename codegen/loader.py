"""Load a Kernel's source as a module (from the on-disk cache) and make its launcher."""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import torch

from .cache import source_path
from .kernel import Kernel


FAST_LAUNCH = os.environ.get("KILN_FAST_LAUNCH", "1") != "0"


def _import(path: str):
    name = "kiln_gen_" + os.path.basename(path)[:-3]
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod


def _conform(t: torch.Tensor, strides) -> torch.Tensor:
    """The kernel was specialised for these strides; copy the rare input that differs. None: an
    input the kernel never reads (an arange it computes: passes/iota.py)."""
    if strides is None:
        return t
    st = t.stride()
    if st == strides or all(s == e for s, e, n in zip(st, strides, t.shape) if n > 1):
        return t
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


class _Memory:
    """An array interface over a tensor's memory: numpy reads it without ``Tensor.numpy()``,
    which marks the storage unresizable for good (a training graph's arena gives its memory
    back between calls by resizing its storage: runtime/executor.py, _release)."""
    __slots__ = ("__array_interface__", "tensor")

    def __init__(self, t: torch.Tensor, n: int, typestr: str):
        self.tensor = t         # the array's base holds this object, and so the tensor's memory
        self.__array_interface__ = {"data": (t.data_ptr(), False), "shape": (n,), "typestr": typestr, "version": 3}


_TYPESTR = {torch.float32: "<f4", torch.float64: "<f8", torch.float16: "<f2", torch.int64: "<i8",
            torch.int32: "<i4", torch.int16: "<i2", torch.int8: "|i1", torch.uint8: "|u1", torch.bool: "|b1"}


def as_array(t: torch.Tensor, n: int | None = None):
    """A 1-D numpy array over ``n`` elements (default: all) from ``t``'s first; no copy."""
    ts, n = _TYPESTR.get(t.dtype), t.numel() if n is None else n
    if ts is None or t.device.type != "cpu":
        return torch.as_strided(t, (n,), (1,), t.storage_offset()).numpy()
    return np.asarray(_Memory(t, n, ts))


def numpy_of(t: torch.Tensor):
    """``t.numpy()`` (same shape and strides), without pinning the storage where ``t`` is dense."""
    if t.is_contiguous() and t.dtype in _TYPESTR and t.device.type == "cpu":
        return as_array(t).reshape(t.shape)
    return t.numpy()


def _span(t: torch.Tensor) -> int:
    """Elements from ``t``'s first to its last in memory (its numel when it is contiguous)."""
    if t.is_contiguous():                   # the common case
        return t.numel()
    return 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) if t.numel() else 0


def _flat(t: torch.Tensor):
    return as_array(t, _span(t))


def load_loop(k: Kernel) -> None:
    """Launchers for loop kernels (kiln.fused groups) on every target."""
    cache_dir = k.meta.get("cache_dir") or os.path.join(os.path.expanduser("~"), ".cache", "kiln")
    in_strides = [tuple(s) if s is not None else None for s in k.meta["in_strides"]]
    if k.target == "cpu":
        fn = getattr(_import(source_path(cache_dir, k.source, "cpu")), k.entry)
        if k.meta.get("pointers"):
            def launch(inputs, outputs):
                ins = [_conform(t, s) for t, s in zip(inputs, in_strides)]    # alive through the call
                fn(*[v for t in (*ins, *outputs) for v in (t.data_ptr(), _span(t))])
        else:                       # a kernel generated before, or over a dtype numba has no scalar for
            def launch(inputs, outputs):
                ins = [_flat(_conform(t, s)) for t, s in zip(inputs, in_strides)]
                fn(*ins, *[_flat(o) for o in outputs])
        k.launcher = launch
        return
    if k.target == "cuda":
        _load_cuda(k, in_strides)
        return
    interpret = not torch.cuda.is_available()
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    fn = getattr(_import(source_path(cache_dir, k.source, "triton")), k.entry)
    from kiln.autotune.heuristics import triton_config
    xn, rn = k.meta["xnumel"], k.meta["rnumel"]
    one_pass = k.meta.get("one_pass", True)
    row = (k.meta.get("itemsize", 4), k.meta.get("shared_row", False))
    kind = k.meta.get("launch_kind", k.kind)      # a pointwise kernel may be laid out in rows
    state = {"cfg": k.meta.get("config") or triton_config(kind, xn, rn, one_pass, interpret, *row)}
    tuned = {"done": interpret or not k.meta.get("autotune") or "config" in k.meta}

    def run(cfg, ins, outs):
        extra = {"num_stages": cfg["num_stages"]} if "num_stages" in cfg else {}
        return fn[(-(-xn // cfg["XBLOCK"]),)](*ins, *outs, xn, rn, XBLOCK=cfg["XBLOCK"], RBLOCK=cfg["RBLOCK"],
                                              num_warps=cfg["num_warps"], **extra)

    fast = {}

    def run_fast(cfg, ins, outs):
        """After the first launch, call the compiled kernel's launcher directly: Triton's JIT
        dispatch (argument binding, specialisation keys) and its per-launch device and stream
        lookups cost more host time than the launch itself."""
        direct = fast.get("k")
        if direct is not None and direct(*ins, *outs):
            return
        ck = run(cfg, ins, outs)
        if direct is None and not interpret and hasattr(ck, "__getitem__"):
            fast["k"] = direct_launcher(ck, (-(-xn // cfg["XBLOCK"]), 1, 1), (xn, rn, cfg["XBLOCK"], cfg["RBLOCK"]),
                                        [*ins, *outs])

    def tune(inputs, outputs, timer=None) -> float:
        """Pick the launch config on these tensors (database, else prune/rank/time); seconds spent."""
        from kiln.autotune import tuner
        ins = [_conform(t, s) for t, s in zip(inputs, in_strides)]
        problem = tuner.loop_problem(kind, xn, rn, one_pass, [*ins, *outputs], len(ins))
        res = tuner.tune_launch(k.source, problem, [*ins, *outputs], lambda cfg: run(cfg, ins, outputs), cache_dir,
                                baseline=state["cfg"], timer=timer)
        state["cfg"] = k.meta["config"] = res.config
        k.meta["tuning_s"] = res.seconds
        fast.clear()
        tuned["done"] = True
        return res.seconds

    def launch(inputs, outputs):
        if not tuned["done"]:
            tune(inputs, outputs)
        ins = [_conform(t, s) for t, s in zip(inputs, in_strides)]
        (run_fast if FAST_LAUNCH else run)(state["cfg"], ins, outputs)
    if not interpret:
        launch.tune = tune          # compile-time tuning (codegen.tune_kernels) calls this
    k.launcher = launch


def _aligned(tensors) -> tuple:
    return tuple(t.data_ptr() % 16 == 0 for t in tensors)


def _set(hook) -> bool:
    """A launch hook is set: a callable, or (Triton 3.6+) a HookChain with hooks in it. An empty
    chain is the default there, and counting it as set sent every launch through the runner."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _launch_hooks():
    try:
        from triton import knobs
        rt = knobs.runtime
        return lambda: _set(rt.launch_enter_hook) or _set(rt.launch_exit_hook)
    except ImportError:         # Triton before knobs: the hooks are CompiledKernel class attributes
        from triton.compiler.compiler import CompiledKernel as C
        return lambda: _set(C.launch_enter_hook) or _set(C.launch_exit_hook)


def direct_launcher(ck, grid, extra, tensors):
    """``launch(*tensors) -> bool`` for a Triton CompiledKernel: its launcher called with the
    current raw stream, as CompiledKernel's own runner does, minus the Python around it (Triton's
    JIT dispatch and per-launch lookups cost more host time than a launch). The kernel was
    specialised for its first tensors' 16-byte pointer alignment: for any other alignment it
    returns False and the caller goes back through Triton's dispatch, which compiles that variant.
    While a launch hook is set (a profiler such as Proton) the runner is used so the hook sees
    every launch."""
    runner = ck[grid]
    launcher, function, packed = ck.run, ck.function, ck.packed_metadata
    g0, g1, g2 = grid
    hooked = _launch_hooks()
    align = _aligned(tensors)
    get_device, get_stream = torch._C._cuda_getDevice, torch._C._cuda_getCurrentRawStream

    def launch(*tensors) -> bool:
        if _aligned(tensors) != align:
            return False
        if hooked():
            runner(*tensors, *extra)
        else:
            launcher(g0, g1, g2, get_stream(get_device()), function, packed, None, None, None, *tensors, *extra)
        return True
    return launch


def _load_cuda(k: Kernel, in_strides) -> None:
    """CUDA C through NVRTC (CuPy), launched on PyTorch's current stream."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"kernel {k.name} targets cuda but no CUDA GPU is available; "
                           "compile with target='cpu' or 'triton' (the Triton interpreter) instead")
    try:
        import cupy
        import numpy as np
    except ImportError as e:
        raise RuntimeError("target='cuda' needs CuPy: pip install 'kiln[cuda12]' or 'kiln[cuda13]'") from e
    fn = cupy.RawModule(code=k.source, options=("-std=c++17",), backend="nvrtc").get_function(k.entry)
    xn, block = max(k.meta["xnumel"], 1), k.meta.get("block", 256)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid = min(-(-xn // block), sms * 32) if k.kind == "pointwise" else min(xn, sms * 64)

    def launch(inputs, outputs):
        ins = [_conform(t, s) for t, s in zip(inputs, in_strides)]
        dev = (outputs or ins)[0].device
        args = tuple(np.uint64(t.data_ptr()) for t in (*ins, *outputs))
        with cupy.cuda.Device(dev.index), cupy.cuda.ExternalStream(torch.cuda.current_stream(dev).cuda_stream):
            fn((grid,), (block,), args)
    k.launcher = launch

"""Launcher of kiln.matmul kernels: picks the config (default, or tuned against cuBLAS), runs
split-K as two passes over an fp32 workspace, and runs cuBLAS with the fused epilogue as an ATen
product followed by the template's epilogue pass (MODE 2)."""
from __future__ import annotations

import os
import warnings

import torch

from .cache import source_path
from .kernel import Kernel
from .loader import FAST_LAUNCH, _conform, _import, direct_launcher
from .matmul_config import default_config, problem_dims

# The epilogue pass after cuBLAS is memory-bound. bench/gpu_epilogue_pass.py on an H200 (bf16):
# 64x128 tiles with 8 warps were within 1% of the best of eight shapes on SwiGLU, bias+GELU and
# bias+residual; 64x64 with 4 warps (before) took 0.183 ms against 0.104 on bias+residual.
EPILOGUE_CFG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _span(t: torch.Tensor) -> tuple[int, int]:
    lo = t.data_ptr()
    return lo, lo + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def _shares_storage(t: torch.Tensor, others) -> bool:
    """Whether ``t``'s bytes overlap any of ``others``' (arena buffers share one storage)."""
    lo, hi = _span(t)
    return any(isinstance(x, torch.Tensor) and x.numel() and _span(x)[0] < hi and lo < _span(x)[1]
               for x in others)


def _pair_view(bs, stride: int, n: int, K: int, bn: int, bk: int, TensorDescriptor):
    """(one [2, n, K] descriptor over two K-major weights, whether the second lies below the
    first), or None: the outer stride is their distance in memory, which TMA takes when it is a
    positive multiple of 16 bytes under 2^40. No copy of either weight is made."""
    first, second = bs
    d = second.data_ptr() - first.data_ptr()
    lo, swap = (first, False) if d > 0 else (second, True)
    d = abs(d)
    if d == 0 or d % 16 or d >= 1 << 40:
        return None
    return TensorDescriptor(lo, [2, n, K], [d // lo.element_size(), stride, 1], [2, bn, bk]), swap


def _warn_once(state: dict, msg: str) -> None:
    if not state.get("warned"):
        state["warned"] = True
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def load_matmul(k: Kernel) -> None:
    meta = k.meta
    cache_dir = meta.get("cache_dir") or os.path.join(os.path.expanduser("~"), ".cache", "kiln")
    interpret = not torch.cuda.is_available()
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    mod = _import(source_path(cache_dir, k.source, "triton"))
    fns = {0: getattr(mod, k.entry), 1: getattr(mod, k.entry + "_gemv", None), 2: getattr(mod, k.entry + "_tma", None)}
    in_strides = [tuple(s) for s in meta["in_strides"]]
    M, K, bt, segs = meta["M"], meta["K"], meta["batch"], meta["segments"]
    n_ws = sum(s["P"] for s in segs)
    ws_shapes = [(s["n"]) for s in segs for _ in range(s["P"])]
    sms = torch.cuda.get_device_properties(0).multi_processor_count if not interpret else 132
    tma = bool(meta.get("tma")) and fns[2] is not None and (interpret or torch.cuda.get_device_capability()[0] >= 9)
    state = {"cfg": meta.get("config") or default_config(meta, interpret, sms, tma)}
    if state["cfg"].get("ATEN") and meta["prologue"]:       # A exists only inside the kernel
        state["cfg"] = {**default_config(meta, interpret, sms, tma), "ATEN": 0}
    if state["cfg"].get("TMA") and not tma:                 # a config tuned on another device
        state["cfg"] = default_config(meta, interpret, sms, tma)
    tuned = {"done": interpret or not meta.get("autotune") or "config" in meta}
    fast: dict = {}

    def grid(cfg, splits):
        tiles_n = sum(_cdiv(s["n"], cfg["BLOCK_N"]) for s in segs)
        if cfg.get("GEMV"):
            return (tiles_n, bt, splits)
        return (_cdiv(M, cfg["BLOCK_M"]) * tiles_n, bt, splits)

    def consts(cfg, mode, splits) -> dict:
        """The constexpr arguments, in the kernels' signature order."""
        bk = cfg["BLOCK_K"]
        return dict(MODE=mode, SPLIT_K=splits, K_PER=_cdiv(_cdiv(K, splits), bk) * bk, EVEN_K=K % bk == 0,
                    BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
                    UPCAST=interpret, DEFER=bool(cfg.get("DEFER", 0)), PREFETCH=bool(cfg.get("PREFETCH", 0)))

    def call(cfg, mode, splits, args):
        """Launch one pass. After its first launch a config's compiled kernel is called directly
        (Triton's dispatch costs more host time than a decode GEMV); a change in pointer alignment,
        which the compiled kernel was specialised for, goes back through Triton."""
        key = (mode, splits, tuple(sorted(cfg.items())))
        hit = fast.get(key)
        if hit is not None:
            try:
                if hit(*args):
                    return None
            except Exception:       # noqa: BLE001 - a Triton without direct launches: use its dispatch
                fast.clear()
                fast["off"] = True
        c = consts(cfg, mode, splits)
        extra = {"num_stages": cfg["num_stages"]} if cfg.get("num_stages") else {}
        fn = fns[1] if cfg.get("GEMV") and mode != 2 else fns[0]
        g = grid(cfg, splits if mode == 1 else 1)
        ret = fn[g](*args, **c, num_warps=cfg["num_warps"], **extra)
        if FAST_LAUNCH and not interpret and not fast.get("off") and hit is None and hasattr(ret, "__getitem__"):
            fast[key] = direct_launcher(ret, g, tuple(c.values()), args)
        return ret

    overlap: dict = {}

    def apart(o, ins) -> bool:
        """``o`` overlaps no input; remembered per set of addresses (the shapes are fixed): measuring
        every input's extent on each call was the executor's largest Python cost in a tiny BERT
        layer's profile (bench/host_tiny_bert.py --profile)."""
        key = (o.data_ptr(), *[x.data_ptr() if isinstance(x, torch.Tensor) else 0 for x in ins])
        ok = overlap.get(key)
        if ok is None:
            if len(overlap) >= 64:
                overlap.clear()
            ok = overlap[key] = not _shares_storage(o, ins)
        return ok

    def run_aten(ins, outs):
        """cuBLAS products; a segment with no epilogue is written straight into its output, and so
        is one whose epilogue is a bias add (through addmm); the others get the template's
        epilogue pass over the products (in place over the output when the segment allows it and
        the output shares no storage with an input)."""
        a = ins[meta["a"]]
        mm = torch.mm if a.dim() == 2 else torch.bmm
        prods = []
        for s in segs:
            o = outs[s["out"]] if s["out"] is not None else None
            inplace = not s["direct"] and s.get("inplace") and apart(o, ins)
            for j, b in enumerate(s["b"]):
                if s["direct"]:                     # each product is an output as it is
                    p = mm(a, ins[b], out=outs[s["outs"][j]])
                elif s.get("bias") is not None:     # product + bias: cuBLAS's bias epilogue
                    bias, oi = s["bias"][j]
                    p = torch.addmm(ins[bias], a, ins[b], out=outs[oi].view(*a.shape[:-1], s["n"]))
                elif j == 0 and inplace:
                    p = mm(a, ins[b], out=o.view(*a.shape[:-1], s["n"]))
                else:
                    p = mm(a, ins[b])
                prods.append(p)
        if not all(s["direct"] or s.get("bias") is not None for s in segs):
            call({**EPILOGUE_CFG, "GEMV": 0}, 2, 1, [*ins, *outs, *prods])

    def run_tma(cfg, ins, outs) -> bool:
        """The persistent TMA kernel (one segment): descriptors over A and each B as stored, and
        over the outputs it stores whole tiles of (``stores``). False (nothing launched) when one
        of those tensors' address is not 16-byte aligned, as TMA needs."""
        from triton.tools.tensor_descriptor import TensorDescriptor
        lay, seg = meta["tma"], segs[0]
        a, bs = ins[meta["a"]], [ins[b] for b in seg["b"]]
        stored = [outs[j] for j in lay.get("stores", [])]
        if any(t.data_ptr() % 16 for t in (a, *bs, *stored)):
            return False
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        descs = [TensorDescriptor(a, [M, K], [lay["a_stride"], 1], [bm, bk])]
        pair = _pair_view(bs, lay["b"][0]["stride"], seg["n"], K, bn, bk, TensorDescriptor) if lay.get("pair") else None
        if pair is not None:
            descs += [pair[0], pair[0]]
        else:
            for b, bl in zip(bs, lay["b"]):
                descs.append(TensorDescriptor(b, [seg["n"], K], [bl["stride"], 1], [bn, bk]) if bl["kmajor"] else
                             TensorDescriptor(b, [K, seg["n"]], [bl["stride"], 1], [bk, bn]))
        descs += [TensorDescriptor(o, [M, seg["n"]], [seg["n"], 1], [bm, bn]) for o in stored]
        g = (min(sms, _cdiv(M, bm) * _cdiv(seg["n"], bn)),)
        fns[2][g](*ins, *outs, *([ins[0]] * n_ws), *descs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                  GROUP_M=cfg["GROUP_M"], NUM_SMS=g[0], FLATTEN=bool(cfg.get("FLATTEN", 1)),
                  PAIR=pair is not None, SWAP=pair is not None and pair[1],
                  num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages") or 3)
        return True

    res = segs[0].get("residual") if len(segs) == 1 and not meta["prologue"] and bt == 1 else None

    def residual_in_place(ins, outs) -> bool:
        """cuBLAS's own C += A @ B where the output was planned over its residual (one that dies
        at the product, passes/inplace.py): the product's time alone. On an H200 (bf16,
        bench/probe_single_tma.py) it took 1.00x cuBLAS's plain product at Llama's down
        projection (8192 x 5632 -> 2048) where the TMA kernel with the residual in its epilogue
        took 1.05-1.09x. False (nothing launched) where the two do not share memory."""
        (r, oi), = res
        o, x = outs[oi], ins[r]
        if o.data_ptr() != x.data_ptr() or not (o.is_contiguous() and x.is_contiguous()):
            return False
        o2 = o.view(M, segs[0]["n"])
        torch.addmm(o2, ins[meta["a"]], ins[segs[0]["b"][0]], out=o2)
        return True

    def run(cfg, ins, outs):
        if res and (cfg.get("TMA") or cfg.get("ATEN")) and residual_in_place(ins, outs):
            return None
        if cfg.get("ATEN"):
            return run_aten(ins, outs)
        if cfg.get("TMA"):
            from triton.runtime.errors import OutOfResources
            unfit = state.setdefault("unfit", set())
            key = tuple(sorted(cfg.items()))
            try:
                if key not in unfit and fns[2] is not None and run_tma(cfg, ins, outs):
                    return None
            except OutOfResources as e:     # a config this device cannot hold: from now on the tile kernel
                unfit.add(key)
                _warn_once(state, f"kiln: matmul {k.name}: the TMA kernel does not fit "
                                  f"({str(e).splitlines()[0]}); running its tile kernel without TMA")
            cfg = {**cfg, "TMA": 0, "SPLIT_K": 1}       # unaligned or too big: the same tile without TMA
        splits = cfg.get("SPLIT_K", 1)
        if splits == 1:
            return call(cfg, 0, 1, [*ins, *outs, *([ins[0]] * n_ws)])
        ws = [torch.empty((splits, bt, M, n), dtype=torch.float32, device=outs[0].device) for n in ws_shapes]
        call(cfg, 1, splits, [*ins, *outs, *ws])
        call(cfg, 2, splits, [*ins, *outs, *ws])

    def tune(inputs, outputs, timer=None) -> float:
        from kiln.autotune import tuner
        from kiln.autotune.space import Problem
        ins = [_conform(t, s) for t, s in zip(inputs, in_strides)]
        problem = Problem("matmul", problem_dims(meta), ins[0].dtype,
                          {"gemv": meta["gemv"], "aten": not meta["prologue"], "identity": meta["identity"],
                           "tma": tma})
        res = tuner.tune_launch(k.source, problem, [*ins, *outputs], lambda cfg: run(cfg, ins, outputs), cache_dir,
                                baseline=state["cfg"], timer=timer)
        state["cfg"] = meta["config"] = res.config
        meta["tuning_s"] = res.seconds
        fast.clear()            # the configs timed while tuning
        tuned["done"] = True
        return res.seconds

    def launch(inputs, outputs):
        if not tuned["done"]:
            tune(inputs, outputs)
        ins = [_conform(t, s) for t, s in zip(inputs, in_strides)]
        run(state["cfg"], ins, outputs)
    if not interpret:
        launch.tune = tune
    k.launcher = launch

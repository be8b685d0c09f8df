"""CUDA graph replay for a compiled graph. Launch-bound graphs (small shapes, many kernels) stop
paying host time per kernel: after warm-up calls, every kernel launch and ATen call is captured
once and later calls replay it. Inputs whose address stayed the same during warm-up (weights)
are read in place; the others are copied into static buffers before each replay. A stable input
that moves forces a new capture; if capture is impossible the graph runs as before (with a
warning). Policy "auto" captures only a launch-bound graph: after the warm-up calls the host's
time to issue the graph is compared with the GPU's time to run it, each the least seen over the
warm-up calls after the first (one call can be a host hiccup, or carry a library's first-use
work on the GPU); a GPU-bound graph gains nothing from replay and would pay for copying inputs
and outputs.

An inference graph's outputs are not cloned out of the graph: it is captured twice, the two
captures replayed in turn, and each call hands out fresh views of its capture's outputs, so a
caller may hold the last call's result while the next one runs. A capture replays only once the
views it handed out two calls ago are let go (their storages' use counts back to the runner's
own); a call that finds them held runs without replay, and after SPARE_MISSES such calls the
graph is captured once more and its outputs cloned from then on (the caller keeps the buffers
it holds). (A Llama layer's output is 32 MiB: its clone reads and writes 64 MiB each call,
~0.015 ms at an H200's copy bandwidth.) With an arena plan the graph's temporaries live in the
arena, made before either capture, and the second capture adds only its outputs; with a dynamic
plan they come from each capture's own pool, so the second capture holds the plan's whole peak
again: it is made only while that is under SPARE_SHARE of the device's free memory (a Llama
layer's 152 MiB on a 141 GB GPU), else the outputs are cloned.

Training graphs replay too. A forward's outputs the backward alone reads (what it saved) are
handed out uncloned, as fresh views of the graph's static buffers, and the backward reads them
in place there; the next replay would overwrite them, so while any view handed out last time is
still held (a second forward before the first's backward) the forward runs without replay.
Replay keeps a graph's memory between calls, which eager frees: under "auto" a training graph
replays only while that memory is small (``TRAIN_HOLD_BYTES``)."""
from __future__ import annotations

import time
import warnings
import weakref

import torch

from .host_alloc import _use_count

MAX_CAPTURES = 4
# "auto" replays when issuing the graph took the host at least this fraction of the GPU's time
# between a call's start and end events (the least of each over the timed warm-up calls), plus
# the copies replay adds. A launch-bound graph keeps the GPU waiting
# on the host, so the two are close (BERT-large layer on an H200: host 0.67 ms for 0.22 ms of
# kernels); a GPU-bound one gains nothing from replay and would pay for copying its outputs
# (bias+GELU+residual 16384x4096: host ~0.05 ms, GPU 0.11 ms; SwiGLU MLP: 0.07 ms, 2.9 ms). The
# line sits at half: with the host near the GPU's time (Llama layer: host ~1.0-2.0 ms from run to
# run for 1.35 ms of kernels) an unreplayed call follows the host's noise (1.38-2.17 ms on an
# H200), a replayed one does not (1.38-1.47 ms).
LAUNCH_BOUND = 0.5
# ... but only where the copies are cheap next to the kernels: replay can save at most the host's
# excess over the GPU and always adds its copies (softmax 4096x8192: host 0.04-0.05 ms, GPU 0.037
# ms, and its 64 MiB output clone makes a replayed call 0.055 ms). Past this share of the GPU's
# time, replay must beat the host's least time outright.
COPY_SHARE = 0.1
# "auto" replays training graphs only while replay would hold at most this much device memory
# between calls, all replayed training graphs together (each one's planned peak and static input
# copies): a launch-bound training step is small (a tiny BERT layer's graphs hold well under a
# megabyte), while a large one's activations are what a training step must give back between its
# forward and backward.
TRAIN_HOLD_BYTES = 256 << 20
# calls that found a capture's handed-out outputs still held before an inference graph goes back
# to cloning its outputs (the caller keeps results longer than a call)
SPARE_MISSES = 2
# a dynamic plan's second capture holds its whole peak again: made only under this share of the
# device's free memory
SPARE_SHARE = 0.25


def should_replay(host_ms: float, gpu_ms: float, copy_ms: float) -> bool:
    """The "auto" decision from the least host and GPU times of the warm-up calls and what
    replay's copies would add on the GPU (all ms)."""
    if host_ms >= gpu_ms + copy_ms:             # host-bound even after paying for the copies
        return True
    return host_ms >= LAUNCH_BOUND * gpu_ms + copy_ms and copy_ms <= COPY_SHARE * gpu_ms


_LIVE: "weakref.WeakSet[CudaGraphRunner]" = weakref.WeakSet()


def _handed(but=None) -> frozenset:
    """Addresses of the saved outputs replayed training forwards hand out."""
    return frozenset().union(*(r.handed_ptrs for r in list(_LIVE) if r is not but and r.handed_ptrs))


def live_runners() -> list["CudaGraphRunner"]:
    """The runners of the compiled graphs still alive (what ``describe`` says of each: the demo
    prints it, tests check it)."""
    return list(_LIVE)


class CudaGraphRunner:
    def __init__(self, compiled, warmup: int = 3, policy: str = "always", saved_from: int | None = None,
                 training: bool = False):
        """``saved_from``: a training forward's outputs from this index on are what its backward
        saved (handed out uncloned: see the module docstring). ``training``: a forward or backward
        graph, which "auto" replays only under ``TRAIN_HOLD_BYTES``."""
        self.compiled = compiled
        self.warmup = warmup
        self.policy = policy
        self.saved_from = saved_from
        self.training = training
        self.launch_bound: bool | None = None      # what the timed warm-up calls showed ("auto")
        self.calls = 0
        self.captures = 0
        self.unreplayed = 0         # calls not replayed: saved outputs still held, or another's not in place
        self.cg: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.key = None
        self.seen_ptrs: list[list[int | None]] = []
        self.samples: list[tuple[float, float]] = []        # (host ms, GPU ms) of timed warm-up calls
        self.watch: list[tuple] = []                # (storage, its use count right after capture)
        self.handed_ptrs: frozenset = frozenset()   # saved outputs' addresses (a backward reads them in place)
        self.pooled: list[bool] = []                # inputs read in place from another graph's replay
        self.held = 0                               # training: device bytes replay would hold (_timed)
        # inference: outputs handed out uncloned from two captures replayed in turn (module docstring)
        self.clone = training or saved_from is not None     # clone the outputs instead
        self.out_watch: list[tuple] = []            # (storage, use count) of the first capture's outputs
        self.spare: tuple | None = None             # the second capture: (graph, outputs, watch)
        self.turn = 0                               # replays handing out uncloned outputs so far
        self.misses = 0
        self._capturing = torch.cuda.is_current_stream_capturing if torch.cuda.is_available() else bool
        # boxed where the graph is (AOTAutograd's convention: the callee empties the argument list)
        self._run = compiled.run_list if hasattr(type(compiled), "run_list") else (lambda xs: compiled(*xs))
        _LIVE.add(self)

    def __getattr__(self, name):            # graph, plan, kernels ... come from the wrapped graph
        return getattr(self.compiled, name)

    @staticmethod
    def _ptrs(inputs):
        return [x.data_ptr() if isinstance(x, torch.Tensor) else None for x in inputs]

    def _capture(self, inputs) -> None:
        self.captures += 1
        # another graph's saved outputs, handed out by its replay, stay at their address while it replays
        pool = _handed(self)
        self.pooled = [isinstance(x, torch.Tensor) and x.data_ptr() in pool for x in inputs]
        stable = [p or (len({q[i] for q in self.seen_ptrs}) == 1 and self.captures < MAX_CAPTURES)
                  for i, p in enumerate(self.pooled)]
        self.stable = stable
        self.static_in = [x if (s or not isinstance(x, torch.Tensor)) else x.clone() for x, s in zip(inputs, stable)]
        self.ptrs = self._ptrs(self.static_in)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.compiled(*self.static_in)          # warm the graph pool on the capture stream
        torch.cuda.current_stream().wait_stream(side)
        self.cg = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.cg):
            self.static_out = self.compiled(*self.static_in)
        # not held: a reference would keep the other graph's views alive, and it from replaying
        self.static_in = [None if p else x for x, p in zip(self.static_in, self.pooled)]
        self.spare, self.turn = None, 0
        if not self.clone and not self._spare_fits():
            self.clone = True
        self.out_watch = [] if self.clone else self._out_watch(self.static_out)
        if self.saved_from is not None:
            # the storages replay writes (not the stable inputs': a saved weight is the caller's)
            kept = {x.untyped_storage().data_ptr() for x, s in zip(self.static_in, stable)
                    if s and isinstance(x, torch.Tensor)}
            saved = [o for o in self.static_out[self.saved_from:]
                     if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in kept]
            self.handed_ptrs = frozenset(o.data_ptr() for o in saved)
            # and how many tensors use each now: a view handed out adds one until the backward lets
            # it go (AOTAutograd saves a view's detached copy, so the view object itself can die
            # while its storage is held)
            stores = {st.data_ptr(): st for st in (o.untyped_storage() for o in saved)}
            self.watch = [(st, _use_count(st)) for st in stores.values()]

    def _out_watch(self, outs) -> list[tuple]:
        """(storage, use count now) of each output storage a capture made, to tell later whether
        views handed out of it are still held; clones from now on (``self.clone``) where an
        output is not the graph's own (an input's storage, or not a tensor's)."""
        ins = {x.untyped_storage().data_ptr() for x in self.static_in if isinstance(x, torch.Tensor)}
        stores = {}
        for o in outs:
            if not isinstance(o, torch.Tensor):
                continue
            st = o.untyped_storage()
            if st.data_ptr() in ins:
                self.clone = True
                return []
            stores[st.data_ptr()] = st
        return [(st, _use_count(st)) for st in stores.values()]

    def _spare_fits(self) -> bool:
        """May a second capture be held (module docstring)? Always with an arena plan; with a
        dynamic one while its peak is under SPARE_SHARE of the free device memory; never for a
        graph whose weights move between memory tiers."""
        plan = getattr(self.compiled, "plan", None)
        if plan is None or getattr(self.compiled, "_tiers", None) is not None:
            return False
        if plan.mode == "arena":
            return True
        free, _ = torch.cuda.mem_get_info()
        return max(plan.device_bytes, plan.peak_bytes) <= SPARE_SHARE * free

    def _capture_spare(self) -> None:
        """The second capture, in a memory pool of its own: in the first one's, its outputs could
        be placed where the first capture keeps a temporary, which the first's next replay would
        write while the caller holds them."""
        cg = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cg):
            out = self.compiled(*self.static_in)
        self.spare = (cg, out, self._out_watch(out))

    def _timed(self, inputs):
        """A warm-up call timed on the host (issuing it) and on the GPU (running it)."""
        moving = self._moving_bytes(inputs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        t0 = time.perf_counter()
        out = self._run(inputs)
        host_ms = (time.perf_counter() - t0) * 1e3
        end.record()
        end.synchronize()
        self.samples.append((host_ms, start.elapsed_time(end)))
        host, gpu = (min(x) for x in zip(*self.samples))
        self.launch_bound = should_replay(host, gpu, self._copy_ms(moving, out))
        if self.training:
            # all replayed training graphs together (one pair per input shape compiled) stay under the cap
            self.held = self._held_bytes(moving)
            others = sum(r.held for r in list(_LIVE) if r is not self and r.training and r.cg is not None)
            self.launch_bound = self.launch_bound and self.held + others <= TRAIN_HOLD_BYTES
        return out

    def _moving_bytes(self, inputs) -> int:
        """Bytes of the inputs whose address changed between calls (replay copies them in)."""
        return sum(x.numel() * x.element_size() for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)
                   and len({p[i] for p in self.seen_ptrs}) > 1)

    def _copy_ms(self, moving: int, out) -> float:
        """What replay adds on the GPU: cloning the outputs out of the graph's pool and copying in
        the inputs whose address changed between calls (read + write at nominal bandwidth)."""
        from kiln.passes.simulate import device_peaks
        outs = [o for o in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(o, torch.Tensor)]
        nbytes = moving + sum(t.numel() * t.element_size() for t in outs)
        return 2 * nbytes / device_peaks("cuda")[0] * 1e3

    def _held_bytes(self, moving: int) -> int:
        """Device memory replay keeps between calls: the graph's planned peak (arena, outputs and
        what else it allocates) and the static copies of its moving inputs."""
        plan = getattr(self.compiled, "plan", None)
        return moving + (max(plan.peak_bytes, plan.device_bytes) if plan is not None else 0)

    def describe(self) -> str:
        """One line on whether calls replay a CUDA graph, and why not."""
        if self.failed:
            return "CUDA graph: capture failed, running without replay"
        if self.cg is not None:
            how = "outputs cloned" if self.clone else "outputs handed out from two captures in turn"
            return f"CUDA graph: replayed ({self.captures} capture{'s' if self.captures != 1 else ''}; {how})"
        if self.launch_bound is False:
            return "CUDA graph: not used (GPU-bound: replay would save no time)" if not self.training else \
                "CUDA graph: not used (GPU-bound, or replay would hold too much memory)"
        return f"CUDA graph: not captured yet ({self.calls} of {self.warmup} warm-up calls)"

    def __call__(self, *inputs):
        return self.run_list(list(inputs))

    def run_list(self, inputs: list):
        """Runs (or replays) the graph; empties ``inputs`` once read, as CompiledGraph.run_list."""
        if self._capturing():
            # the caller is capturing its own CUDA graph (a decode loop, a benchmark): the kernels
            # go into it; replaying or timing here would fail (no replay or sync inside a capture)
            return self._run(inputs)
        if self.launch_bound is False and self.calls >= self.warmup and self.policy == "auto":
            # decided: GPU-bound, no replay. A compiled graph has one input signature (kiln
            # compiles each shape on its own), so nothing below can change that; skipping the
            # per-call key was ~9 us of a 33 us softmax kernel's call on an H200's host
            return self._run(inputs)
        if self.failed or not all(
                not isinstance(x, torch.Tensor) or x.is_cuda for x in inputs):
            return self._run(inputs)
        key = tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in inputs)
        if key != self.key:
            self.key, self.cg, self.calls, self.seen_ptrs, self.launch_bound = key, None, 0, [], None
            self.samples = []
        self.calls += 1
        if self.cg is None and self.calls <= self.warmup:
            self.seen_ptrs.append(self._ptrs(inputs))
            if self.policy == "auto" and (self.calls > 1 or self.warmup == 1):
                return self._timed(inputs)
            return self._run(inputs)
        if self.policy == "auto" and not self.launch_bound:
            return self._run(inputs)
        if any(_use_count(st) > n for st, n in self.watch):
            # what the last replay saved for a backward is still held: replay would overwrite it
            self.unreplayed += 1
            return self._run(inputs)
        moved = [s and isinstance(x, torch.Tensor) and x.data_ptr() != p
                 for x, s, p in zip(inputs, self.stable, self.ptrs)] if self.cg is not None else []
        moved = moved if any(moved) else []
        if moved and all(p for m, p in zip(moved, self.pooled) if m) and \
                not any(m and x.data_ptr() in _handed() for m, x in zip(moved, inputs)):
            # another graph's saved outputs came from a call that did not replay: run on them as
            # they are (they are back in place once that graph replays again; a new capture of
            # it moves them for good, and this graph is captured again)
            self.unreplayed += 1
            return self._run(inputs)
        if self.cg is None or moved:
            try:
                self.seen_ptrs.append(self._ptrs(inputs))
                self._capture(inputs)
            except Exception as e:             # an op that cannot be captured: run as before from now on
                self.failed, self.cg, self.handed_ptrs = True, None, frozenset()
                first = (str(e).strip().splitlines() or [""])[0][:200]
                warnings.warn(f"kiln: CUDA graph capture failed ({type(e).__name__}: {first}); "
                              "the graph runs without replay")
                return self._run(inputs)
        cg, out, watch = self.cg, self.static_out, self.out_watch
        if not self.clone and self.turn % 2:
            if self.spare is None:
                try:
                    self._capture_spare()
                except Exception:           # noqa: BLE001 - one capture replays as before, cloning
                    self.clone = True
            if not self.clone:
                cg, out, watch = self.spare
        if any(_use_count(st) > n for st, n in watch):
            # what this capture handed out two calls ago is still held: replay would overwrite it
            self.unreplayed += 1
            self.misses += 1
            if self.misses >= SPARE_MISSES:
                # clone from now on, from a new capture: the caller keeps the old ones' outputs
                self.clone, self.spare, self.cg, self.out_watch = True, None, None, []
            return self._run(inputs)
        for x, s, buf in zip(inputs, self.stable, self.static_in):
            if not s and isinstance(x, torch.Tensor):
                buf.copy_(x)
        inputs.clear()
        cg.replay()
        if not self.clone:
            self.turn += 1
        return self._outputs(out)

    def _outputs(self, out) -> list:
        """Clones of the outputs (``self.clone``), else fresh views of the capture's; a training
        forward's saved ones are always views, watched (see run_list) until the backward lets
        them go."""
        cut = len(out) if self.saved_from is None else self.saved_from
        res = [(o.clone() if self.clone else o.as_strided(o.shape, o.stride(), o.storage_offset()))
               if isinstance(o, torch.Tensor) else o for o in out[:cut]]
        saved = [o.as_strided(o.shape, o.stride(), o.storage_offset()) if isinstance(o, torch.Tensor) else o
                 for o in out[cut:]]
        return res + saved

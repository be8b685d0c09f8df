"""Executes a CacheSchedule: weights live in their home tier and visit one device pool.

Homes: pinned host buffers (CUDA) or the constants themselves (CPU), memory-mapped files for
the disk tier, the caller's tensors for parameters passed as inputs. On CUDA a copy is enqueued
on a side stream after the event that frees its slot and records a ready event the compute
stream waits on before the first reader; disk reads run on a background thread into pinned
staging buffers first. On the CPU one background thread does every copy, so transfers overlap
compute there too, and the device tier is a separate arena whose capacity is enforced: after
every step the runtime counts what the device holds (pool, arena, inputs, live activations) and
raises TierOverflow if that exceeds the budget. Outputs the schedule spills (a training step's
gradients, saved activations) are copied to host buffers after their last read in the graph,
and the caller receives the host copies."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kiln.ir import OpKind, map_values, op_kind
from kiln.ir.ops import run as run_aten
from kiln.passes.cache_schedule import CacheSchedule


class TierOverflow(RuntimeError):
    """The device tier held more than its budget."""


def _span(t: torch.Tensor, ty) -> torch.Tensor:
    """The bytes of ``t``'s storage its (strided) layout spans, as a flat uint8 tensor."""
    n = 1 + sum((s - 1) * st for s, st in zip(ty.shape, ty.strides))
    return t.as_strided((n,), (1,), t.storage_offset()).contiguous().view(torch.uint8)


class TierRuntime:
    def __init__(self, graph, schedule, arena_bytes: int = 0):
        self.s = schedule if isinstance(schedule, CacheSchedule) else CacheSchedule.from_dict(schedule)
        self.pre, self.ready, self.evict = self.s.per_step()
        self.types = {v.name: v.type for v in graph.leaves()}
        self.graph = graph
        self.planned = {sl.item for sl in self.s.slots}
        self.arena_bytes = arena_bytes
        self.inputs = [v.name for v in graph.inputs]
        self.wait_steps = sorted({sl.wait for sl in self.s.slots if sl.load >= 0 and sl.wait >= 0})
        self.pool: dict = {}             # device -> uint8 tensor
        self.homes: dict = {}            # item -> host/pinned uint8 tensor or np.memmap
        self._dir = None
        self._persist_done: set = set()
        self._pool_exec = None
        self.stats = {"calls": 0, "loaded_bytes": 0, "max_device_bytes": 0}
        self.trace: list | None = None   # set to [] to record (step, start, end) host times per call
        self.copies: list = []           # with trace on the CPU: (slot, start, end) of each copy
        self.rebase = self._rebased_outputs(graph)
        self.spill_at: dict = {}         # step -> values (one storage each) to hand to the host after it
        for _, step, _, names in getattr(self.s, "spills", ()):
            self.spill_at.setdefault(int(step), []).append(list(names))
        self._host: list = []            # this call's spilled host buffers

    def _rebased_outputs(self, graph) -> list:
        """Outputs that are a planned weight or a chain of views of one: on the CPU they are
        re-made from the weight's home after the call (a device slot is reused by the next call)."""
        prod, out = graph.producers(), []
        for v in graph.output_values():
            nodes, x = [], v.name
            while x not in self.planned and x in prod and op_kind(prod[x].op) == OpKind.VIEW \
                    and len(prod[x].inputs()) == 1:
                nodes.append(prod[x])
                x = prod[x].inputs()[0].name
            if x in self.planned:
                out.append((v.name, x, nodes[::-1]))
        return out

    # ---- homes ----------------------------------------------------------------------------------
    def _home(self, name: str, cuda: bool):
        h = self.homes.get(name)
        if h is not None:
            return h
        home = next(sl.home for sl in self.s.slots if sl.item == name)
        data = _span(self.graph.constants[name], self.types[name])
        if home == "disk":
            if self._dir is None:
                root = os.path.join(os.environ.get("KILN_CACHE_DIR") or tempfile.gettempdir(), "tiers")
                os.makedirs(root, exist_ok=True)
                self._dir = tempfile.mkdtemp(prefix="disk-", dir=root)
                weakref.finalize(self, shutil.rmtree, self._dir, True)
            path = os.path.join(self._dir, f"{len(self.homes)}.bin")
            mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(data.numel(),))
            mm[:] = data.numpy()
            mm.flush()
            h = np.memmap(path, dtype=np.uint8, mode="c", shape=(data.numel(),))   # copy-on-write: never written
        elif cuda:
            h = data.pin_memory()
        else:
            h = data
        self.homes[name] = h
        return h

    def _src(self, k: int, cuda: bool):
        sl = self.s.slots[k]
        if self.s.sources.get(sl.item) == "input":
            return self._inputs[sl.item]
        return self._home(sl.item, cuda)

    def _view(self, pool: torch.Tensor, k: int) -> torch.Tensor:
        sl = self.s.slots[k]
        t = self.types[sl.item]
        return pool[sl.offset: sl.offset + sl.nbytes].view(t.dtype).as_strided(t.shape, t.strides)

    # ---- one call -------------------------------------------------------------------------------
    def begin(self, env: dict, inputs, device: torch.device, arena: torch.Tensor | None = None) -> None:
        self.cuda = device.type == "cuda"
        pool = self.pool.get(device)
        if pool is None:
            pool = self.pool[device] = torch.empty(self.s.pool_bytes, dtype=torch.uint8, device=device)
            self._persist_done = set()
            if self.cuda:
                self.side = torch.cuda.Stream(device)
                self.events = {w: torch.cuda.Event() for w in self.wait_steps}
                self._staging = []
        self._pool_t = pool
        self._inputs, self._orig = {}, {}
        for v, x in zip(self.graph.inputs, inputs):
            if v.name in self.planned:
                self._inputs[v.name] = _span(x, self.types[v.name])
                self._orig[v.name] = x
                env.pop(v.name, None)
        if self._pool_exec is None:
            self._pool_exec = ThreadPoolExecutor(1, thread_name_prefix="kiln-tiers")
        self.pending: dict = {}
        if self.cuda:
            self.start_ev = torch.cuda.Event()
            self.start_ev.record()
        for k, sl in enumerate(self.s.slots):           # persistent items: loaded on the first call
            if sl.load < 0:
                if (device, k) not in self._persist_done:
                    pool[sl.offset: sl.offset + sl.nbytes].copy_(self._as_tensor(self._src(k, self.cuda)))
                    self._persist_done.add((device, k))
                env[sl.item] = self._view(pool, k)
        self.resident = sum(sl.nbytes for sl in self.s.slots if sl.load < 0)
        in_bytes = sum(x.untyped_storage().nbytes() for v, x in zip(self.graph.inputs, inputs)
                       if isinstance(x, torch.Tensor) and v.name not in self.planned and x.device == device)
        self.base = self.s.pool_bytes + self.arena_bytes + in_bytes
        if self.cuda:
            self.m0 = torch.cuda.memory_allocated(device)
        else:
            self._skip = {pool.untyped_storage().data_ptr()}
            if arena is not None:
                self._skip.add(arena.untyped_storage().data_ptr())
            self._skip |= {x.untyped_storage().data_ptr() for x in inputs if isinstance(x, torch.Tensor)}
            self._skip |= {c.untyped_storage().data_ptr() for c in self.graph.constants.values()
                           if isinstance(c, torch.Tensor)}
        self._host = []
        self.stats["calls"] += 1

    @staticmethod
    def _as_tensor(h):
        return torch.from_numpy(np.asarray(h)) if isinstance(h, np.memmap) else h

    def _issue(self, k: int) -> None:
        sl = self.s.slots[k]
        dst = self._pool_t[sl.offset: sl.offset + sl.nbytes]
        src = self._src(k, self.cuda)
        self.stats["loaded_bytes"] += sl.nbytes
        if not self.cuda:
            self.pending[k] = self._pool_exec.submit(self._copy, k, dst, self._as_tensor(src))
            return
        free_ev = self.events[sl.wait] if sl.wait >= 0 else self.start_ev
        if isinstance(src, np.memmap):
            self.pending[k] = self._pool_exec.submit(self._disk_to_device, src, dst, free_ev)
            return
        with torch.cuda.stream(self.side):
            self.side.wait_event(free_ev)
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.side)
        self.pending[k] = ev

    def _copy(self, k: int, dst, src):
        """Background thread (CPU): one copy into the device arena, timed when tracing."""
        t0 = time.perf_counter()
        dst.copy_(src)
        if self.trace is not None:
            self.copies.append((k, t0, time.perf_counter()))
        return dst

    def _disk_to_device(self, mm, dst, free_ev):
        """Background thread: disk -> pinned staging -> device (on the side stream)."""
        stage = next((s for s in self._staging if s[0].numel() >= mm.shape[0] and s[1].query()), None)
        if stage is None:
            stage = (torch.empty(mm.shape[0], dtype=torch.uint8).pin_memory(), torch.cuda.Event())
            self._staging.append(stage)
        buf = stage[0][:mm.shape[0]]
        buf.copy_(torch.from_numpy(np.asarray(mm)))
        with torch.cuda.stream(self.side):
            self.side.wait_event(free_ev)
            dst.copy_(buf, non_blocking=True)
            stage[1].record(self.side)
            ev = torch.cuda.Event()
            ev.record(self.side)
        return ev

    def before(self, i: int, env: dict) -> None:
        for k in self.pre[i]:
            self._issue(k)
            self.resident += self.s.slots[k].nbytes
        for k in self.ready[i]:
            p = self.pending.pop(k)
            if not isinstance(p, torch.cuda.Event):
                p = p.result()
            if isinstance(p, torch.cuda.Event):
                torch.cuda.current_stream().wait_event(p)
            env[self.s.slots[k].item] = self._view(self._pool_t, k)
        if self.trace is not None:
            self._t0 = time.perf_counter()

    def after(self, i: int, env: dict) -> None:
        if self.trace is not None:
            self.trace.append((i, self._t0, time.perf_counter()))
        if self.cuda and i in self.events:
            self.events[i].record()
        for k in self.evict[i]:
            env.pop(self.s.slots[k].item, None)
            self.resident -= self.s.slots[k].nbytes
        for names in self.spill_at.get(i, ()):
            self._spill(names, env)
        if self.resident > self.s.pool_bytes:
            raise TierOverflow(f"device pool holds {self.resident} B > {self.s.pool_bytes} B after step {i}")
        used = self.device_bytes(env)
        self.stats["max_device_bytes"] = max(self.stats["max_device_bytes"], used)
        if used > self.s.budget:
            raise TierOverflow(f"device tier holds {used} B > memory_budget {self.s.budget} B after step {i}")

    def _spill(self, names: list, env: dict) -> None:
        """Copy the storage these values view to a host buffer and put views of the copy (same
        offsets and strides) in place of every value that views it: later views are made of the
        copy, the caller receives it, and the device storage is free."""
        x = next((env[a] for a in names if isinstance(env.get(a), torch.Tensor)), None)
        if x is None:
            return
        st = x.untyped_storage()
        ptr = st.data_ptr()
        h = torch.empty(st.nbytes(), dtype=torch.uint8)
        h.copy_(torch.empty(0, dtype=torch.uint8, device=x.device).set_(st))
        self._host.append(h)                 # held for the call: its address never names device bytes
        self._skip.add(h.untyped_storage().data_ptr())
        self.stats["spilled_bytes"] = self.stats.get("spilled_bytes", 0) + st.nbytes()
        for k, v in list(env.items()):
            if isinstance(v, torch.Tensor) and v.device == x.device and v.untyped_storage().data_ptr() == ptr:
                env[k] = torch.empty(0, dtype=v.dtype).set_(h.untyped_storage(), v.storage_offset(), v.shape,
                                                            v.stride())

    def device_bytes(self, env: dict) -> int:
        """What the device tier holds now: pool + arena + inputs + live activations."""
        if self.cuda:
            return self.base + torch.cuda.memory_allocated(self._pool_t.device) - self.m0
        seen, live = set(self._skip), 0
        for x in env.values():
            if isinstance(x, torch.Tensor) and x.device.type == self._pool_t.device.type:
                st = x.untyped_storage()
                p = st.data_ptr()
                if p not in seen:
                    seen.add(p)
                    live += st.nbytes()
        return self.base + live

    def end(self, env: dict) -> None:
        for p in self.pending.values():     # loads nobody read (none in a valid schedule)
            if not isinstance(p, torch.cuda.Event):
                p.result()
        self.pending = {}
        self._host = []                      # the caller's outputs hold what they view
        if self.cuda:
            return
        for out, item, nodes in self.rebase:
            vals = {item: self._orig[item] if item in self._orig else self.graph.constants[item]}
            get = lambda v: vals[v.name]  # noqa: E731
            for nd in nodes:
                vals[nd.outputs[0].name] = run_aten(nd, map_values(nd.args, get), map_values(nd.kwargs, get))
            env[out] = vals[out]

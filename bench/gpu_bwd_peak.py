"""Where kiln's BERT training backward peaks (H200 diagnostic): memory_allocated after every executor step of the
backward, the live values at the peak, and any CUDA tensor >= 100 MiB alive there and what holds it.

    PYTHONPATH=$PWD python bench/gpu_bwd_peak.py
"""
import sys, functools, gc
sys.path.insert(0, "bench")
import torch
from gpu_memory import configs, Logits, warm_workspaces
from kiln.api import kiln_backend
from kiln.runtime import executor as ex
mk, ins = configs(False)["bert"]
torch.manual_seed(0)
model = Logits(mk()).cuda().train(); kw = ins(); warm_workspaces()
trace = {"on": False}
orig = ex.CompiledGraph.run_list
def run_list(self, inputs):
    if not trace["on"] or self.graph.meta.get("graph_kind") != "backward":
        return orig(self, inputs)
    steps, best = self._steps, [0, -1, None]
    mem0 = torch.cuda.memory_allocated()
    names = [n.op for n in self.graph.nodes]
    # the tier hooks run after every step: borrow them to watch memory
    class T:
        def begin(s, *a): pass
        def before(s, k, env): pass
        def after(s, k, env):
            torch.cuda.synchronize(); m = torch.cuda.memory_allocated()
            if m > best[0]:
                best[0], best[1] = m, k
                best.append(s.scan(k, env))
                best[2] = sorted(((v.untyped_storage().nbytes() if isinstance(v, torch.Tensor) else 0, n, tuple(v.shape) if isinstance(v, torch.Tensor) else None) for n, v in env.items()), reverse=True)[:14]
        def end(s, env): pass
        def scan(s, k, env):
            lines, seen = [], {}
            for n, v in env.items():
                if isinstance(v, torch.Tensor):
                    seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
            def real(o):
                try:
                    return isinstance(o, torch.Tensor) and o.is_cuda and o.untyped_storage().data_ptr() != 0 and o.untyped_storage().nbytes() >= 100 << 20
                except Exception:
                    return False
            big = [o for o in gc.get_objects() if real(o)]
            for o in big:
                for r in gc.get_referrers(o):
                    if isinstance(r, list):
                        owners = [(type(x).__name__, getattr(getattr(x, "f_code", None), "co_name", None) or getattr(x, "__qualname__", "")) for x in gc.get_referrers(r)]
                        lines.append(f"   list of {len(r)} holds it; the list's referrers: {owners[:6]}")
            return lines + [f"   step {k}: env storages {sum(seen.values())/2**20:.1f} MiB; CUDA tensors >= 100 MiB alive: "
                  f"{[(tuple(o.shape), o.untyped_storage().data_ptr() in seen, [type(r).__name__ for r in gc.get_referrers(o)][:4]) for o in big]}"]
    self._tiers = T()
    try:
        return orig(self, inputs)
    finally:
        self._tiers = None
        print(f"bwd: start {mem0/2**20:.1f} MiB, peak {best[0]/2**20:.1f} MiB at step {best[1]}/{len(steps)} ({names[best[1]]}), mode {self.plan.mode}, arena {self.plan.arena_bytes/2**20:.1f} MiB")
        for nb, n, sh in best[2]: print(f"   {nb/2**20:8.1f} MiB {n} {sh}")
        print("\n".join(best[-1]))
        print("   first nodes:", [(n.op, [o.name for o in n.outputs]) for n in self.graph.nodes[:8]])
ex.CompiledGraph.run_list = run_list
c = torch.compile(model, backend=functools.partial(kiln_backend, options={"target": "triton", "cudagraphs": False}))
for i in range(3):
    for p in model.parameters(): p.grad = None
    trace["on"] = i == 2
    gc.collect(); torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    y = c(**kw).float().sum(); torch.cuda.synchronize(); held = torch.cuda.memory_allocated()
    y.backward(); torch.cuda.synchronize()
    if i == 2: print(f"base {base/2**20:.1f}, held after fwd {held/2**20:.1f}, step peak {torch.cuda.max_memory_allocated()/2**20:.1f} MiB")

"""CUDA graph replay policy pieces that need no GPU."""
import pytest
import torch

from kiln.runtime.cudagraphs import should_replay


def test_cuda_graph_replay_cost_counts_outputs_and_moving_inputs():
    """Replay clones the outputs and copies in inputs whose address changes between calls: "auto"
    weighs that against the host time it saves (the runner itself needs a GPU)."""
    from kiln.passes.simulate import device_peaks
    from kiln.runtime.cudagraphs import CudaGraphRunner
    r = CudaGraphRunner(compiled=None, policy="auto")
    still, moving = torch.empty(1 << 20, dtype=torch.uint8), torch.empty(1 << 10, dtype=torch.uint8)
    r.seen_ptrs = [[still.data_ptr(), 1], [still.data_ptr(), 2]]
    out = [torch.empty(1 << 18, dtype=torch.float32), None]
    want = 2 * ((1 << 10) + (1 << 20)) / device_peaks("cuda")[0] * 1e3
    assert r._moving_bytes([still, moving]) == 1 << 10
    assert abs(r._copy_ms(r._moving_bytes([still, moving]), out) - want) < 1e-12
    assert r.describe() == "CUDA graph: not captured yet (0 of 3 warm-up calls)"


# host, GPU and copy ms measured on an H200 (runtime/cudagraphs.py names each case): replay where
# the host holds the GPU up and the copies are cheap, never where they cost more than it saves
@pytest.mark.parametrize("host, gpu, copy, replay", [
    (0.67, 0.22, 0.004, True),      # BERT-large layer: launch-bound
    (1.00, 1.35, 0.014, True),      # Llama layer: host near the GPU's time, copies ~1% of it
    (0.05, 0.11, 0.06, False),      # bias+GELU+residual: GPU-bound
    (0.07, 2.90, 0.03, False),      # SwiGLU MLP: GPU-bound
    (0.047, 0.037, 0.028, False),   # softmax: host a little over the GPU, 64 MiB output clone
    (0.070, 0.037, 0.028, True),    # ... unless the host alone is slower than replay
    (1.00, 0.10, 0.05, True),       # launch-bound with large outputs: replay still wins
])
def test_auto_replay_rule(host, gpu, copy, replay):
    assert should_replay(host, gpu, copy) is replay


def test_gpu_bound_decision_skips_the_per_call_work():
    """Once "auto" has decided a graph is GPU-bound, a call goes straight to the compiled graph
    (a compiled graph has one input signature; the runner's per-call key was host time)."""
    from kiln.runtime.cudagraphs import CudaGraphRunner
    seen = []
    r = CudaGraphRunner(compiled=lambda *a: seen.append(a) or "ran", policy="auto")
    r.launch_bound, r.calls = False, r.warmup
    marker = object()
    assert r(marker) == "ran" and seen == [(marker,)] and r.key is None    # no per-call key taken
    r.launch_bound, r.calls = False, 1  # still warming up: the decision may change
    assert r(marker) == "ran" and r.key == (marker,)


def test_second_capture_only_where_memory_allows(monkeypatch):
    """Inference outputs come from two captures in turn (no clone) when the second capture's
    memory is affordable: always with an arena plan (it adds only its outputs), with a dynamic
    plan while its peak is under SPARE_SHARE of the free device memory, never with memory tiers."""
    import types
    from kiln.runtime import cudagraphs
    from kiln.runtime.cudagraphs import SPARE_SHARE, CudaGraphRunner

    def runner(mode, peak, tiers=None):
        plan = types.SimpleNamespace(mode=mode, device_bytes=peak, peak_bytes=0)
        return CudaGraphRunner(compiled=types.SimpleNamespace(plan=plan, _tiers=tiers), policy="always")

    free = 100 << 30
    fake_cuda = types.SimpleNamespace(**{k: getattr(torch.cuda, k) for k in ("CUDAGraph", "graph", "Stream")},
                                      mem_get_info=lambda: (free, 141 << 30), is_available=lambda: False)
    monkeypatch.setattr(cudagraphs.torch, "cuda", fake_cuda)
    assert runner("arena", 1 << 40)._spare_fits()
    assert runner("dynamic", 152 << 20)._spare_fits()                  # a Llama layer
    assert not runner("dynamic", int(SPARE_SHARE * free) + 1)._spare_fits()
    assert not runner("arena", 0, tiers=object())._spare_fits()
    assert not CudaGraphRunner(compiled=None)._spare_fits()

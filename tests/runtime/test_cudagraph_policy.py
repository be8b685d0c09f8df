"""CUDA graph replay policy pieces that need no GPU."""
import torch


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
    assert abs(r._copy_ms([still, moving], out) - want) < 1e-12
    assert r.describe() == "CUDA graph: not captured yet (0 of 3 warm-up calls)"

"""The tuner's GPU timer on a real GPU (skipped without CUDA): every timed run starts from a cold
L2, so a read that fits in L2 times slower than the same read run back to back."""
import pytest
import torch

from kiln.autotune.measure import l2_bytes, time_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _hot_ms(fn, reps: int = 50) -> float:
    """Back-to-back runs in one CUDA graph: the operand stays in L2 between them."""
    fn()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def test_time_gpu_runs_from_a_cold_l2():
    n = min(32 * 2**20, l2_bytes() // 2) // 4          # half of L2, fp32
    x = torch.ones(n, device="cuda")
    out = torch.empty((), device="cuda")
    read = lambda: torch.sum(x, dim=0, out=out)        # noqa: E731
    cold, hot = time_gpu(read), _hot_ms(read)
    assert torch.isfinite(torch.tensor(cold)) and cold > 0
    assert cold > 1.1 * hot, (cold, hot)

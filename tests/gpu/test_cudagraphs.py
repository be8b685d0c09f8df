"""CUDA graph replay of inference graphs (skipped without CUDA): "auto" captures a launch-bound
graph and leaves a GPU-bound one alone; replayed results match eager, also when the input moves."""
import pytest
import torch

import kiln

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _runner(compiled_fn):
    """The CudaGraphRunner kiln compiled for the (single) graph, from Dynamo's cache."""
    from kiln.runtime.cudagraphs import CudaGraphRunner
    import gc
    found = [o for o in gc.get_objects() if type(o) is CudaGraphRunner]   # (isinstance trips on dead proxies)
    assert len(found) == 1, len(found)
    return found[0]


class Small(torch.nn.Module):          # many tiny kernels: launch-bound
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(6))
        self.norm = torch.nn.LayerNorm(64)

    def forward(self, x):
        for lin in self.layers:
            x = x + torch.nn.functional.gelu(lin(self.norm(x)))
        return x


@needs_cuda
@pytest.mark.parametrize("policy, captured", [("auto", True), (True, True), (False, None)])
def test_launch_bound_graph_replays(policy, captured):
    import gc
    gc.collect()
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Small().cuda().eval()
    f = kiln.compile(model, target="triton", cudagraphs=policy)
    with torch.no_grad():
        for i in range(5):
            x = torch.randn(8, 64, device="cuda")          # a new address every call: copied in
            torch.testing.assert_close(f(x), model(x), rtol=1e-4, atol=1e-4)
    if captured is None:
        gc.collect()
        from kiln.runtime.cudagraphs import CudaGraphRunner
        assert not any(type(o) is CudaGraphRunner for o in gc.get_objects())
        return
    r = _runner(f)
    assert r.cg is not None and not r.failed
    assert policy is True or r.launch_bound is True
    assert r.describe().startswith("CUDA graph: replayed")


@needs_cuda
def test_gpu_bound_graph_is_not_captured_under_auto():
    import gc
    gc.collect()
    torch._dynamo.reset()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)      # ~1.5 ms of matmul
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    f = kiln.compile(lambda a, b: torch.relu(a @ b), target="triton")
    with torch.no_grad():
        for _ in range(5):
            out = f(a, b)
    torch.testing.assert_close(out, torch.relu(a @ b), rtol=2e-2, atol=1.0)
    r = _runner(f)
    assert r.launch_bound is False and r.cg is None
    assert "GPU-bound" in r.describe()

"""CUDA graph replay of inference graphs (skipped without CUDA): "auto" captures a launch-bound
graph and leaves a GPU-bound one alone; replayed results match eager, also when the input moves."""
import gc

import pytest
import torch

import kiln

pytestmark = [pytest.mark.gpu, pytest.mark.timing]     # "auto" times warm-up calls
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _runners() -> list:
    from kiln.runtime.cudagraphs import live_runners
    gc.collect()
    return live_runners()


def _new_runner(before: list):
    """The one CudaGraphRunner made since ``before`` (other tests' runners may still be alive)."""
    old = {id(o) for o in before}
    found = [o for o in _runners() if id(o) not in old]
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
    torch._dynamo.reset()
    before = _runners()
    torch.manual_seed(0)
    model = Small().cuda().eval()
    f = kiln.compile(model, target="triton", cudagraphs=policy)
    with torch.no_grad():
        for i in range(5):
            x = torch.randn(8, 64, device="cuda")          # a new address every call: copied in
            torch.testing.assert_close(f(x), model(x), rtol=1e-4, atol=1e-4)
    if captured is None:
        old = {id(o) for o in before}
        assert not [o for o in _runners() if id(o) not in old]
        return
    r = _new_runner(before)
    assert r.cg is not None and not r.failed
    assert policy is True or r.launch_bound is True
    assert r.describe().startswith("CUDA graph: replayed")


@needs_cuda
def test_gpu_bound_graph_is_not_captured_under_auto():
    torch._dynamo.reset()
    before = _runners()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)      # ~1.5 ms of matmul
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    f = kiln.compile(lambda a, b: torch.relu(a @ b), target="triton")
    with torch.no_grad():
        for _ in range(5):
            out = f(a, b)
    torch.testing.assert_close(out, torch.relu(a @ b), rtol=2e-2, atol=1.0)
    r = _new_runner(before)
    assert r.launch_bound is False and r.cg is None
    assert "GPU-bound" in r.describe()


@needs_cuda
@pytest.mark.parametrize("policy", ["auto", True])
def test_call_inside_the_callers_own_capture(policy):
    """A caller may capture a compiled function in its own CUDA graph (a decode loop, a benchmark)
    after kiln has started replaying its own: the call then runs the kernels into the caller's
    capture instead of replaying (no replay or timing sync inside a capture)."""
    torch._dynamo.reset()
    before = _runners()
    torch.manual_seed(0)
    model = Small().cuda().eval()
    f = kiln.compile(model, target="triton", cudagraphs=policy)
    x = torch.randn(8, 64, device="cuda")
    with torch.no_grad():
        for _ in range(5):
            f(x)
        assert _new_runner(before).cg is not None          # kiln replays its own graph by now
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            f(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = f(x)
        x.copy_(torch.randn(8, 64, device="cuda"))
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)


def _replayed_small(n: int):
    """Small on the GPU compiled with replay on, ``n`` inputs for it, and the runners alive before."""
    torch._dynamo.reset()
    before = _runners()
    torch.manual_seed(0)
    model = Small().cuda().eval()
    f = kiln.compile(model, target="triton", cudagraphs=True)
    return model, f, [torch.randn(8, 64, device="cuda") for _ in range(n)], before


@needs_cuda
def test_outputs_handed_out_from_two_captures_in_turn():
    """An inference graph's outputs are not cloned: two captures replay in turn, so the result of
    the last call stays intact while the next call runs; a capture's buffers come back once the
    caller lets its result go (the third call reuses the first's)."""
    model, f, xs, before = _replayed_small(8)
    with torch.no_grad():
        for x in xs[:4]:                        # warm-up calls, then the first capture replays
            f(x)
        r = _new_runner(before)
        assert r.cg is not None and not r.clone
        prev = f(xs[4])
        ptrs = [prev.data_ptr()]
        for x, last in zip(xs[5:], xs[4:]):
            out = f(x)                          # the previous result is still held here
            torch.testing.assert_close(prev, model(last), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
            ptrs.append(out.data_ptr())
            prev = out
    assert ptrs[0] != ptrs[1] and ptrs[0] == ptrs[2] and ptrs[1] == ptrs[3]
    assert r.spare is not None and r.unreplayed == 0 and "two captures" in r.describe()


@needs_cuda
def test_results_kept_longer_than_a_call_stay_intact():
    """A caller that keeps every result: a capture whose earlier result is still held does not
    replay over it; after SPARE_MISSES such calls the graph is captured again and its outputs
    cloned (as before), and every kept result still matches eager."""
    from kiln.runtime.cudagraphs import SPARE_MISSES
    model, f, xs, before = _replayed_small(10)
    with torch.no_grad():
        kept = [f(x) for x in xs]
        for x, out in zip(xs, kept):
            torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    r = _new_runner(before)
    assert r.clone and r.unreplayed == SPARE_MISSES and r.captures == 2 and "outputs cloned" in r.describe()

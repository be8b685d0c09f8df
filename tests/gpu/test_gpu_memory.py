"""Peak device memory of compiled models against eager PyTorch's caching allocator, inference and
a training step (skipped without CUDA). bench/gpu_memory.py gives the figures at larger sizes."""
import functools
import os
import sys

import pytest
import torch

from kiln.api import kiln_backend

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench"))
from gpu_memory import peak, warm_workspaces  # noqa: E402
from models.mlp import ResidualMLP  # noqa: E402

# CUDA graph replay off: a captured graph keeps its tensors in a private pool that the
# allocator's peak statistics do not see during replay, so the figures would flatter kiln
OPTIONS = {"target": "triton", "cudagraphs": False}

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def MLP():
    """The model this file and bench/gpu_peak_trace.py measure."""
    return ResidualMLP(1024, 4)


@needs_cuda
@pytest.mark.parametrize("train", [False, True], ids=["inference", "train"])
def test_peak_memory_not_above_eager(train):
    torch.manual_seed(0)
    model = MLP().cuda().train(train)
    x = torch.randn(4096, 1024, device="cuda", requires_grad=train)

    def step(f):
        def run():
            if train:
                for p in model.parameters():
                    p.grad = None
                f(x).sum().backward()
            else:
                with torch.no_grad():
                    f(x)
        return run
    warm_workspaces()           # library workspaces are the process's, not either model's
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    step(model)()
    eager = peak(step(model), base)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=functools.partial(kiln_backend, options=OPTIONS))
    step(compiled)()
    step(compiled)()
    ours = peak(step(compiled), base)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-3, atol=1e-3)
    print(f"peak bytes: eager {eager:,}, kiln {ours:,} ({ours / eager:.3f}x)")
    assert ours <= eager

"""The tier runtime on a GPU: weights in pinned host memory (or memory-mapped files) visit the
device pool on a side stream; outputs match eager on the device and the device tier (measured
with the caching allocator's counters) never exceeds the budget."""
from __future__ import annotations

import pytest
import torch

from kiln.aot import compile_ahead
from .common import stack, weight_bytes

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.mark.parametrize("dtype,rows", [(torch.float32, 1), (torch.bfloat16, 256)])
def test_streamed_weights_match_eager(dtype, rows):
    model, _ = stack(d=256, h=1024, layers=6)
    model = model.to(dtype)
    x = torch.randn(rows, 256, dtype=dtype)
    budget = int(0.3 * weight_bytes(model))
    compiled, report = compile_ahead(model, (x,), {"target": "triton", "memory_budget": budget})
    dev = stack(d=256, h=1024, layers=6)[0].to(dtype).cuda()
    dev.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref = dev(x.cuda())
        for _ in range(3):
            out = compiled(x.cuda())[0]
            torch.cuda.synchronize()
            tol = dict(rtol=5e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out, ref, **tol)
    st = compiled._tiers.stats
    assert 0 < st["max_device_bytes"] <= budget
    assert report.memory["transfers_bytes"] > 0.5 * weight_bytes(model)


def test_disk_tier_on_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    model, (x,) = stack(d=256, h=512, layers=4)
    wb = weight_bytes(model)
    tiers = ["device", {"name": "host", "capacity": wb // 3}, "disk"]
    compiled, report = compile_ahead(model, (x,), {"target": "triton", "memory_budget": int(0.35 * wb),
                                                   "tiers": tiers})
    assert report.memory["per_tier"]["disk"] > 0
    dev = stack(d=256, h=512, layers=4)[0].cuda()
    dev.load_state_dict(model.state_dict())
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled(x.cuda())[0], dev(x.cuda()), rtol=1e-4, atol=1e-4)
    assert compiled._tiers.stats["max_device_bytes"] <= int(0.35 * wb)

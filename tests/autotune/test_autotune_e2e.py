"""End to end: without a GPU (Triton interpreter, or the CPU target) autotune=True compiles,
matches eager and skips tuning cleanly; on a GPU, tuning happens at compile time and a second
compile reads the database."""
import os

import pytest
import torch

import kiln
from kiln.autotune import database


def f(x, w):
    return torch.softmax(x * w, -1) + torch.nn.functional.gelu(x)


@pytest.mark.parametrize("target", ["triton", "cpu"])
def test_autotune_without_gpu_is_skipped(tmp_path, target):
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU path")
    x, w = torch.randn(8, 33), torch.randn(33)
    torch._dynamo.reset()
    got = kiln.compile(f, target=target, autotune=True, cache_dir=str(tmp_path))(x, w)
    torch.testing.assert_close(got, f(x, w), rtol=1e-4, atol=1e-5)
    rep = kiln.last_report()
    assert rep.tuning_s == 0.0 and any(k["target"] == target for k in rep.kernels)
    assert "autotune" not in [p["name"] for p in rep.passes]
    assert not os.path.exists(os.path.join(tmp_path, database.DB_NAME))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_time_tuning_then_cache_hit(tmp_path):
    x, w = torch.randn(4096, 1000, device="cuda"), torch.randn(1000, device="cuda")
    torch._dynamo.reset()
    got = kiln.compile(f, target="triton", autotune=True, cache_dir=str(tmp_path))(x, w)
    torch.testing.assert_close(got, f(x, w), rtol=1e-4, atol=1e-5)
    first = kiln.last_report()
    assert first.tuning_s > 0 and "autotune" in [p["name"] for p in first.passes]
    db = database.open_database(str(tmp_path))
    assert db.count() > 0
    n = db.count()
    torch._dynamo.reset()
    got = kiln.compile(f, target="triton", autotune=True, cache_dir=str(tmp_path))(x, w)
    torch.testing.assert_close(got, f(x, w), rtol=1e-4, atol=1e-5)
    assert kiln.last_report().tuning_s == 0.0 and db.count() == n

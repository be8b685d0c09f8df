"""kiln.matmul kernels on a real GPU against eager (skipped without CUDA): every launch mode
(tile, GEMV, split-K, cuBLAS + fused epilogue), epilogues, prologues and horizontal fusion, bf16."""
import pytest
import torch

import kiln
from kiln.codegen import matmul_launch

pytestmark = pytest.mark.gpu
F = torch.nn.functional
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF = torch.bfloat16


def _check(fn, *args, cfg=None, rtol=2e-2, atol=7e-2, monkeypatch=None):
    """bf16: kiln rounds the product before its epilogue as the decomposed graph does (eager's
    addmm rounds once), so sums of O(4) values may differ by an ulp (0.03) here and there."""
    if cfg is not None:
        base = matmul_launch.default_config
        monkeypatch.setattr(matmul_launch, "default_config",
                            lambda meta, interp, sms=132, tma=False: {**base(meta, interp, sms, tma), **cfg})
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = kiln.compile(fn, target="triton")
        first, again = compiled(*args), compiled(*args)     # the second call launches directly
        ref = fn(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for got in (first, again):
        got = got if isinstance(got, tuple) else (got,)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g.float(), r.float(), rtol=rtol, atol=atol)
    kinds = [k for k in kiln.last_report().kernels if k["kind"] == "matmul"]
    assert any(k["target"] == "triton" for k in kinds), kinds


MODES = {"tile": {"GEMV": 0}, "gemv": {"GEMV": 1}, "splitk": {"GEMV": 0, "SPLIT_K": 4},
         "gemv_defer_prefetch": {"GEMV": 1, "DEFER": 1, "PREFETCH": 1, "BLOCK_K": 128},
         "gemv_splitk": {"GEMV": 1, "SPLIT_K": 2}, "cublas": {"ATEN": 1}, "default": None}


@needs_cuda
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("M", [1, 16, 300])
def test_linear_epilogues_all_modes(mode, M, monkeypatch):
    cfg = MODES[mode]
    if cfg and cfg.get("GEMV") and M > 16:
        pytest.skip("GEMV kernel is for M <= 16")
    torch.manual_seed(0)
    x = torch.randn(M, 512, device="cuda", dtype=BF)
    w, b = torch.randn(768, 512, device="cuda", dtype=BF) / 20, torch.randn(768, device="cuda", dtype=BF)
    r = torch.randn(M, 768, device="cuda", dtype=BF)
    _check(lambda x, w, b, r: F.gelu(F.linear(x, w, b)) + r, x, w, b, r, cfg=cfg, monkeypatch=monkeypatch)


@needs_cuda
@pytest.mark.parametrize("mode", ["tile", "gemv", "gemv_defer_prefetch", "splitk", "cublas"])
def test_swiglu_and_qkv(mode, monkeypatch):
    torch.manual_seed(0)
    M = 4 if "gemv" in mode else 200
    x = torch.randn(M, 256, device="cuda", dtype=BF)
    g, u = torch.randn(320, 256, device="cuda", dtype=BF) / 16, torch.randn(320, 256, device="cuda", dtype=BF) / 16
    q, k = torch.randn(256, 256, device="cuda", dtype=BF) / 16, torch.randn(64, 256, device="cuda", dtype=BF) / 16
    _check(lambda x, g, u: F.silu(F.linear(x, g)) * F.linear(x, u), x, g, u, cfg=MODES[mode], monkeypatch=monkeypatch)
    _check(lambda x, q, k: (F.linear(x, q), F.linear(x, k) + 1), x, q, k, cfg=MODES[mode], monkeypatch=monkeypatch)


@needs_cuda
def test_bmm_prologue_and_fp32():
    torch.manual_seed(0)
    a, b = torch.randn(6, 100, 64, device="cuda"), torch.randn(6, 64, 72, device="cuda")
    _check(lambda a, b: torch.relu(torch.bmm(a.to(BF), b.to(BF))).float() * 2, a, b)
    _check(lambda a, b: torch.tanh(torch.bmm(a, b)), a, b, rtol=1e-4, atol=1e-4)
    _check(lambda a, b: torch.matmul(a, b[0]) * 0.5, a, b, rtol=1e-4, atol=1e-4)


@needs_cuda
def test_autotune_picks_and_matches():
    torch.manual_seed(0)
    x = torch.randn(64, 1024, device="cuda", dtype=BF)
    w = torch.randn(2048, 1024, device="cuda", dtype=BF) / 32
    fn = lambda x, w: F.silu(F.linear(x, w))  # noqa: E731
    torch._dynamo.reset()
    with torch.no_grad():
        got = kiln.compile(fn, target="triton", autotune=True)(x, w)
    torch.testing.assert_close(got.float(), fn(x, w).float(), rtol=2e-2, atol=2e-2)
    assert kiln.last_report().tuning_s >= 0


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a GPU with TMA (sm90+)")
@pytest.mark.parametrize("case", ["swiglu", "down_residual", "n_major_gelu"])
def test_tma_kernel_by_default_for_large_fused_epilogues(case, descriptors):
    """Products over 2^35 FLOPs whose epilogue cuBLAS cannot run take the persistent TMA kernel
    by default (a SwiGLU pair, a residual add, B stored N-major); bf16 against eager."""
    torch.manual_seed(0)
    M, E, I = 2048, 2048, 5632
    x = torch.randn(M, E, device="cuda", dtype=BF)
    g, u = (torch.randn(I, E, device="cuda", dtype=BF) / E ** 0.5 for _ in range(2))
    d = torch.randn(E, I, device="cuda", dtype=BF) / I ** 0.5
    h = torch.randn(M, I, device="cuda", dtype=BF)
    if case == "swiglu":
        _check(lambda x, g, u: F.silu(F.linear(x, g)) * F.linear(x, u), x, g, u)
    elif case == "down_residual":
        _check(lambda h, d, x: F.linear(h, d) + x, h, d, x)
    else:
        w = torch.randn(E, I, device="cuda", dtype=BF) / E ** 0.5       # [K, N], used as stored
        _check(lambda x, w: F.gelu(x @ w), x, w)
    assert descriptors, "the TMA kernel did not run"
    if case == "swiglu":        # gate and up read through one 3-D view of both
        assert any(len(d.shape) == 3 for d in descriptors), [d.shape for d in descriptors]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a GPU with TMA (sm90+)")
def test_tma_kernel_falls_back_on_an_unaligned_input(descriptors):
    """An input 2 bytes off a 16-byte boundary (TMA's requirement) runs the same tile without
    TMA, and matches eager."""
    torch.manual_seed(0)
    M, K, N = 2048, 5632, 2048
    h = torch.empty(M * K + 1, device="cuda", dtype=BF)[1:].view(M, K).normal_()
    d = torch.randn(N, K, device="cuda", dtype=BF) / K ** 0.5
    x = torch.randn(M, N, device="cuda", dtype=BF)
    _check(lambda h, d, x: F.linear(h, d) + x, h, d, x)
    assert not descriptors


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a GPU with TMA (sm90+)")
def test_gqa_projections_run_k_and_v_as_one_tma_launch(descriptors):
    """Plain q, k, v projections at cuBLAS's sizes (Llama's GQA: k and v a quarter of q's width
    here): q stays with cuBLAS, k and v run as one TMA launch over both weights; bf16 against eager."""
    torch.manual_seed(0)
    M, E, NQ, NKV = 4096, 2048, 2048, 256
    x = torch.randn(M, E, device="cuda", dtype=BF)
    q, k, v = (torch.randn(n, E, device="cuda", dtype=BF) / E ** 0.5 for n in (NQ, NKV, NKV))
    _check(lambda x, q, k, v: (F.linear(x, q), F.linear(x, k), F.linear(x, v)), x, q, k, v)
    assert sorted(len(d.shape) for d in descriptors[:4]) == [2, 2, 2, 3], [d.shape for d in descriptors]  # a call

"""``1 + erf(x)`` (GELU's CDF, forward and backward) and ``1 - erf(x)`` run as one
erfc: Triton kernels call the exp2-polynomial ``_erfc`` helper (checked here against math.erfc
through the interpreter), numba kernels keep ``1 - erf`` (the same bits as before), CUDA C calls
erfcf. GELU in fp32 and bf16, forward and backward, matches eager on every target."""
import importlib.util
import math

import pytest
import torch
from test_cuda_sources import _groups

import kiln
from kiln.codegen.lower import lower
from kiln.codegen.triton_gen import HELPERS

F = torch.nn.functional
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TARGETS = ["cpu", "triton"]


def _ops(lk):
    def walk(e):
        return [e.op] + [o for a in getattr(e, "args", ()) for o in walk(a)] if hasattr(e, "op") else []
    return [o for st in lk.stmts for o in walk(st.expr)]


def _helper_module(tmp_path):
    src = "import triton\nimport triton.language as tl\n" + HELPERS["erfc"] + '''

@triton.jit
def k(X, Y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(Y + o, _erfc(tl.load(X + o)))
'''
    p = tmp_path / "erfc_helper.py"
    p.write_text(src)
    spec = importlib.util.spec_from_file_location("erfc_helper", p)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_triton_erfc_helper_against_math_erfc(tmp_path, dev):
    if dev == "cpu" and torch.cuda.is_available():
        pytest.skip("the interpreter runs only on machines without a GPU")
    m = _helper_module(tmp_path)
    xs = torch.cat([torch.linspace(-12, 12, 8189), torch.tensor([float("inf"), float("-inf"), float("nan")])])
    n = 1 << (xs.numel() - 1).bit_length()
    x = torch.zeros(n, device=dev)
    x[:xs.numel()] = xs.to(dev)
    y = torch.empty(n, device=dev)
    m.k[(1,)](x, y, n)
    y = y[:xs.numel()].cpu().double()
    ref = torch.tensor([math.erfc(v) if not math.isnan(v) else v for v in xs.tolist()], dtype=torch.float64)
    fin = torch.isfinite(xs)
    assert (y - ref).abs()[fin].max() < 6e-7      # fit 3e-7, plus ex2.approx's error on a GPU
    mid = fin & (xs >= 0) & (xs <= 5)
    assert ((y - ref).abs() / ref)[mid].max() < 1e-5                # relative, down to erfc(5) = 1.5e-12
    assert y[-3:-1].tolist() == [0.0, 2.0] and math.isnan(y[-1])


def test_gelu_cdf_and_erfc_lower_to_one_erfc():
    x, b = torch.randn(4, 16), torch.randn(16)
    gelu = [lower(n) for n in _groups(lambda x, b: F.gelu(x + b), x, b)]
    assert len(gelu) == 1 and "erfc" in _ops(gelu[0]) and "erf" not in _ops(gelu[0])
    erfc = [lower(n) for n in _groups(lambda x: (1 - torch.erf(x)) * 2, x)]
    assert "erfc" in _ops(erfc[0]) and "erf" not in _ops(erfc[0])
    # the erf value is also an output: it stays, and the sum reads it
    def both_fn(x):
        e = torch.erf(x)
        return e, e + 1
    both = [lower(n) for n in _groups(both_fn, x)]
    assert "erf" in _ops(both[0]) and "erfc" not in _ops(both[0])


@pytest.mark.parametrize("target,dev", [("cpu", "cpu"), ("triton", "cpu"),
                                        *[pytest.param(t, "cuda", marks=[pytest.mark.gpu, needs_cuda])
                                          for t in ("triton", "cuda")]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_forward_backward_match_eager(target, dev, dtype):
    if dev == "cpu" and target == "triton" and torch.cuda.is_available():
        pytest.skip("the interpreter runs only on machines without a GPU")
    torch.manual_seed(0)
    x = (torch.randn(8, 64) * 4).to(dtype).to(dev)
    x[0, :6] = torch.tensor([-9.0, -6.0, -3.0, 0.0, 3.0, 9.0]).to(dtype)
    b = torch.randn(64).to(dtype).to(dev)

    def f(x, b):
        return F.gelu(x + b) * 1.5, 1 - torch.erf(x.float() * 0.3)

    xa, ba = x.clone().requires_grad_(), b.clone().requires_grad_()
    torch._dynamo.reset()
    got = kiln.compile(f, target=target)(xa, ba)
    assert any(k["target"] == target for k in kiln.last_report().kernels)
    (got[0].float().sum() + got[1].sum()).backward()
    xe, be = x.clone().requires_grad_(), b.clone().requires_grad_()
    want = f(xe, be)
    (want[0].float().sum() + want[1].sum()).backward()
    tol = {} if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(xa.grad, xe.grad, **tol)
    torch.testing.assert_close(ba.grad, be.grad, **tol)


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_gelu_negative_tail_is_not_cancelled_on_triton(dev):
    """erfc keeps GELU's negative tail, which 1 + erf rounded to 0 (eager's fp32 result is 0 too)."""
    if dev == "cpu" and torch.cuda.is_available():
        pytest.skip("the interpreter runs only on machines without a GPU")
    x = torch.tensor([-5.0, -6.0, -7.0, -8.0] * 4, device=dev)
    torch._dynamo.reset()
    got = kiln.compile(F.gelu, target="triton")(x).double().cpu()
    x = x.cpu()
    want = x.double() * 0.5 * torch.special.erfc(-x.double() / math.sqrt(2))
    assert (got < 0).all() and (got - want).abs().max() < 2e-12
    assert ((got - want).abs() / want.abs())[x > -7.07].max() < 1e-5    # |x| / sqrt(2) <= 5: the fit

"""``1 + tanh(y)`` (the tanh GELU as GPT-2 writes it) runs as ``2 * sigmoid(2y)``, the same value
without the cancellation for y < 0; Triton kernels on a GPU compute an fp32 sigmoid through
ex2.approx and rcp.approx (codegen/triton_gen.py ``_sigmoid``, checked as PTX in
test_triton_ptx.py). Values against float64 on every target, and eager's within tolerance."""
import math

import pytest
import torch
from test_cuda_sources import _groups
from test_erfc import _ops

import kiln
from kiln.codegen.lower import lower

TARGETS = ["cpu", "triton"]


def new_gelu(x):            # transformers' NewGELUActivation (GPT-2)
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def test_one_plus_tanh_lowers_to_a_sigmoid_unless_the_tanh_is_read_elsewhere():
    x = torch.randn(64, 256)
    [n] = _groups(new_gelu, x)
    ops = _ops(lower(n))
    assert "sigmoid" in ops and "tanh" not in ops
    [n] = _groups(lambda x: (1 + torch.tanh(x)) * torch.tanh(x), x)       # the tanh is read twice
    assert "tanh" in _ops(lower(n))
    [n] = _groups(lambda x: (torch.tanh(x), torch.tanh(x) + 1), x)        # the tanh is an output
    assert "tanh" in _ops(lower(n))


@pytest.mark.parametrize("target", TARGETS)
def test_tanh_gelu_keeps_its_negative_tail(target):
    """Where eager's 1 + tanh cancels (x = -5: 30% off, x = -6: 0), kiln is within 1e-5 of the
    float64 value (x * sigmoid(2y), the same function: float64's 1 + tanh cancels too, by x = -8)."""
    x = torch.tensor([-9.0, -8.0, -6.0, -5.0, -4.0, -3.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 3.0, 10.0])
    torch._dynamo.reset()
    got = kiln.compile(new_gelu, target=target)(x)
    xd = x.double()
    ref = xd * torch.sigmoid(2 * math.sqrt(2.0 / math.pi) * (xd + 0.044715 * xd ** 3))
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(got, new_gelu(x), rtol=1e-5, atol=1e-6)       # eager's, within its error
    wide = torch.linspace(-12, 12, 2049)
    torch.testing.assert_close(kiln.compile(new_gelu, target=target)(wide), new_gelu(wide), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_sigmoid_through_ex2_and_rcp():
    """On the GPU (the inline rcp.approx path): sigmoid, silu and the tanh GELU in fp32 within a few
    ulp of float64 (see below), special values as eager (silu(-inf) is NaN there too); in bf16 within
    one rounding of float64."""
    x = torch.cat([torch.linspace(-30, 30, 8191), torch.tensor([-100.0, 100.0, float("inf"), -float("inf")])]).cuda()
    fns = {"sigmoid": torch.sigmoid, "silu": torch.nn.functional.silu, "gelu": new_gelu}
    for name, fn in fns.items():
        torch._dynamo.reset()
        got = kiln.compile(fn, target="triton")(x)
        ref = fn(x.double()) if name != "gelu" else \
            x.double() * torch.sigmoid(2 * math.sqrt(2.0 / math.pi) * (x.double() + 0.044715 * x.double() ** 3))
        # exp(-x) is ex2(-x log2(e)), whose fp32 argument carries |x| log2(e) 2^-24 of rounding: at
        # |x| = 30, 1.8e-6 relative in the result (tl.exp's too; eager's expf reduces it exactly).
        # GELU's sigmoid(2u) in its tail magnifies u's own fp32 rounding (a few ulp) by |2u|, up to
        # 87 where the result is still a normal float: 1.7e-5 (eager's fp32 1 + tanh is 0 there)
        tol = 4e-5 if name == "gelu" else 4e-6
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=1e-30, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")
        torch._dynamo.reset()           # bf16 in and out, fp32 inside: one rounding (half an ulp, 2^-9)
        xb = x.bfloat16()
        got = kiln.compile(fn, target="triton")(xb)
        xd = xb.double()
        ref = fn(xd) if name != "gelu" else xd * torch.sigmoid(2 * math.sqrt(2.0 / math.pi) * (xd + 0.044715 * xd ** 3))
        torch.testing.assert_close(got.double(), ref, rtol=2 ** -8, atol=1e-30, equal_nan=True,
                                   msg=lambda m, name=name: f"{name} bf16: {m}")
    nan = torch.tensor([float("nan")], device="cuda")
    torch._dynamo.reset()
    assert kiln.compile(torch.sigmoid, target="triton")(nan).isnan().all()

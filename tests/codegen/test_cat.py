"""Concatenation of equal-shaped tensors runs as a generated pointwise kernel (a ``where`` over
the inputs broadcast along a new dim) and matches eager: any dim, negative dims, three inputs,
type promotion, bool, non-contiguous halves (rotary's rotate_half); unequal shapes stay ATen."""
import pytest
import torch

import kiln

TARGETS = ["cpu", "triton"]


def _ops(target, f, *args):
    torch._dynamo.reset()
    got = kiln.compile(f, target=target)(*args)
    torch.testing.assert_close(got, f(*args))
    return {o for k in kiln.last_report().kernels if k["target"] == "aten" for o in k["ops"]}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_equal_shapes_fuse(target, dim):
    a, b, c = torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert "aten.cat.default" not in _ops(target, lambda a, b: torch.cat([a, b], dim) * 2, a, b)
    assert "aten.cat.default" not in _ops(target, lambda a, b, c: torch.cat([a, b, c], dim) + 1, a, b, c)


@pytest.mark.parametrize("target", TARGETS)
def test_rotate_half_and_promotion(target):
    x = torch.randn(2, 6, 3, 8).transpose(1, 2)          # [B, H, S, D] view of [B, S, H, D]

    def rope(x, cos, sin):
        x1, x2 = x[..., :4], x[..., 4:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    cos, sin = torch.randn(6, 8), torch.randn(6, 8)
    assert "aten.cat.default" not in _ops(target, rope, x, cos, sin)
    i, f = torch.arange(6).view(2, 3), torch.randn(2, 3)
    _ops(target, lambda i, f: torch.cat([i, f], 1), i, f)
    m = torch.rand(2, 3) > 0.5
    _ops(target, lambda m, n: torch.cat([m, n], 0), m, ~m)


@pytest.mark.parametrize("target", TARGETS)
def test_unequal_shapes_stay_aten(target):
    a, b = torch.randn(3, 4), torch.randn(3, 2)
    assert "aten.cat.default" in _ops(target, lambda a, b: torch.cat([a, b], 1) * 2, a, b)


def test_many_inputs_stay_aten():
    xs = [torch.randn(2, 3) for _ in range(6)]
    assert "aten.cat.default" in _ops("cpu", lambda *xs: torch.cat(xs, 0) * 2, *xs)


def test_rotary_is_one_kernel():
    """q * cos + rotate_half(q) * sin over a transposed q: the negation, the cat (as a where over
    [..., 2, D/2]), its view back to [..., D] and the multiply-adds share one loop domain."""
    x = torch.randn(2, 6, 3, 8).transpose(1, 2)

    def rope(x, cos, sin):
        x1, x2 = x[..., :4], x[..., 4:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    cos, sin = torch.randn(6, 8), torch.randn(6, 8)
    for target in TARGETS:
        _ops(target, rope, x, cos, sin)
        kernels = [k for k in kiln.last_report().kernels if k["target"] != "aten"]
        assert len(kernels) == 1, kernels

"""kiln's own decompositions: what they turn into (so fusion sees through them) and that the
result matches eager."""
import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from kiln.ir.decompose import decomposition_table

aten = torch.ops.aten


def _ops(fn, *args):
    gm = make_fx(fn, decomposition_table=decomposition_table())(*args)
    return [n.target for n in gm.graph.nodes if n.op == "call_function"], gm


@pytest.mark.parametrize("empty", [torch.empty(0), torch.empty(3, 0, 4)], ids=["legacy_1d", "zero_along_dim"])
def test_cat_with_empty_inputs_is_a_copy(empty):
    """A fresh KV cache: cat([empty, k]) is k copied, which fuses."""
    x = torch.randn(2, 3, 4).transpose(0, 1)          # non-contiguous: the copy is contiguous, as cat's is
    ops, gm = _ops(lambda e, x: torch.cat([e, x], dim=1), empty, x)
    assert aten.cat.default not in ops
    out, want = gm(empty, x), torch.cat([empty, x], dim=1)
    assert torch.equal(out, want) and out.is_contiguous()


def test_cat_with_empty_input_promotes():
    e, x = torch.empty(0, dtype=torch.float64), torch.randn(2, 3)
    ops, gm = _ops(lambda e, x: torch.cat([e, x]), e, x)
    assert aten.cat.default not in ops
    assert gm(e, x).dtype == torch.float64 and torch.equal(gm(e, x), torch.cat([e, x]))


def test_real_cat_stays():
    a, b = torch.randn(2, 3), torch.randn(2, 5)
    ops, gm = _ops(lambda a, b: torch.cat([a, b], -1), a, b)
    assert aten.cat.default in ops
    assert torch.equal(gm(a, b), torch.cat([a, b], -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_product_over_one_k_is_a_multiply(dtype):
    """mm / bmm with K = 1 (older transformers' rotary tables: inverse frequencies @ positions)
    become a broadcast multiply, bit-equal to the product; K = 2 stays a matmul."""
    inv = (1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)).to(dtype)
    pos = torch.arange(32, dtype=dtype)
    batched = (inv[None, :, None].expand(3, -1, 1), pos[None, None].expand(3, 1, -1))
    for fn, args in [(lambda a, b: a @ b, (inv[:, None], pos[None])), (lambda a, b: torch.bmm(a, b), batched)]:
        ops, gm = _ops(fn, *args)
        assert not {aten.mm.default, aten.bmm.default} & set(ops), ops
        assert torch.equal(gm(*args), fn(*args))
    a, b = torch.randn(4, 2, dtype=dtype), torch.randn(2, 5, dtype=dtype)
    assert aten.mm.default in _ops(lambda a, b: a @ b, a, b)[0]


def test_split_becomes_slices():
    x = torch.randn(4, 12)
    ops, gm = _ops(lambda x: [t * 2 for t in torch.split(x, [3, 4, 5], dim=1)], x)
    assert aten.split_with_sizes.default not in ops and aten.split.Tensor not in ops
    for a, b in zip(gm(x), [t * 2 for t in torch.split(x, [3, 4, 5], dim=1)]):
        assert torch.equal(a, b)


def test_eval_batchnorm_is_functional():
    """no_training batchnorm decomposes through _native_batch_norm_legit(training=False), whose
    schema mutates the running stats: it must decompose further."""
    m = torch.nn.BatchNorm2d(3).eval()
    m.running_mean.uniform_()
    x = torch.randn(2, 3, 4, 4)
    ops, gm = _ops(lambda x, w, b, rm, rv: torch.nn.functional.batch_norm(x, rm, rv, w, b, False),
                   x, m.weight.detach(), m.bias.detach(), m.running_mean, m.running_var)
    assert not any(getattr(o, "_schema", None) is not None and o._schema.is_mutable for o in ops), ops
    torch.testing.assert_close(gm(x, m.weight.detach(), m.bias.detach(), m.running_mean, m.running_var),
                               m(x))


@pytest.mark.parametrize("ord_,dim,keep", [(2, None, False), (2, -1, True), (1, (0, 2), False),
                                           (math.inf, 1, False), (-math.inf, 0, True), (0, -1, False),
                                           (3.5, (1,), False)])
def test_vector_norm_is_a_reduction(ord_, dim, keep):
    """linalg_vector_norm (F.normalize, x.norm) becomes a pointwise prologue and a reduction."""
    x = torch.randn(3, 4, 5)
    x[0, 0, 0] = 0.0
    fn = lambda x: torch.linalg.vector_norm(x, ord_, dim, keepdim=keep)  # noqa: E731
    ops, gm = _ops(fn, x)
    assert aten.linalg_vector_norm.default not in ops
    torch.testing.assert_close(gm(x), fn(x))


def test_vector_norm_gradient_matches_eager():
    """Autograd differentiates the norm itself (the decomposition applies below autograd), so
    the gradient at a zero row is eager's."""
    import kiln
    torch._dynamo.reset()
    x = torch.randn(4, 6)
    x[0] = 0
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    f = lambda x: (torch.nn.functional.normalize(x, dim=-1) * torch.arange(6.0)).sum() + x.norm(dim=0).sum()  # noqa: E731
    f(xa).backward()
    kiln.compile(f, target="cpu")(xb).backward()
    torch.testing.assert_close(xb.grad, xa.grad)


@pytest.mark.parametrize("target", ["cpu", "triton"])
def test_variance_of_data_far_from_zero(target):
    """var, std and var_mean correct the second pass for the mean's rounding: without it a mean
    1000 with std 0.01 gave var 1e-4 off (relative) in fp32 on the cpu target, eager 3e-8."""
    import kiln
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(0)) * 0.01 + 1000.0
    fn = lambda x: (x.var(-1), x.std(-1, correction=0), *torch.var_mean(x, 0, correction=2))  # noqa: E731
    torch._dynamo.reset()
    got, want = kiln.compile(fn, target=target)(x), fn(x)
    exact = [t(x.double()) for t in (lambda y: y.var(-1), lambda y: y.std(-1, correction=0),
                                    lambda y: y.var(0, correction=2), lambda y: y.mean(0))]
    for g, w, e in zip(got, want, exact):
        assert float(((g.double() - e).abs() / e.abs()).max()) < 4 * float(((w.double() - e).abs() / e.abs()).max()) + 1e-6
    var = torch.ones(2, 5)
    torch._dynamo.reset()
    assert torch.equal(kiln.compile(lambda v: v.var(-1), target=target)(var * 3.7), torch.zeros(2))  # never below 0

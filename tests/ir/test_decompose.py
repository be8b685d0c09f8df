"""kiln's own decompositions: what they turn into (so fusion sees through them) and that the
result matches eager."""
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

"""Embeddings run as kiln's row-gather kernel (numba on the cpu target, Triton through its
interpreter) and match eager: index dtypes and shapes (0-d, empty), strided weights, every
dtype as a bit copy; an index out of range raises as eager does; training leaves the backward's
scatter-add to ATen and its gradients match."""
import pytest
import torch

import kiln

F = torch.nn.functional
TARGETS = ["cpu", "triton"]


def _run(f, *args, target):
    torch._dynamo.reset()
    got = kiln.compile(f, target=target)(*args)
    kinds = [(k["kind"], k["target"]) for k in kiln.last_report().kernels]
    return got, kinds


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_embedding_matches_eager(target, dtype, idx_dtype):
    w = (torch.randn(50, 24) * 10).to(dtype)
    ids = torch.randint(0, 50, (3, 7), dtype=idx_dtype)
    got, kinds = _run(F.embedding, ids, w, target=target)
    assert torch.equal(got, F.embedding(ids, w))
    assert ("gather", "cpu" if target == "cpu" else "triton") in kinds


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 0, 3), (2, 3, 4)])
def test_index_shapes_and_strided_weight(target, shape):
    w = torch.randn(40, 9).t().contiguous().t()          # column-major: strides (1, 40)
    ids = torch.randint(0, 40, shape)
    got, _ = _run(lambda i, w: F.embedding(i, w) + 1, ids, w, target=target)
    torch.testing.assert_close(got, F.embedding(ids, w) + 1)


def test_index_out_of_range_raises_on_cpu():
    w = torch.randn(10, 4)
    f = kiln.compile(lambda i, w: F.embedding(i, w), target="cpu")
    f(torch.tensor([1, 2]), w)
    with pytest.raises(IndexError, match="out of range"):
        f(torch.tensor([1, 10]), w)
    with pytest.raises(IndexError, match="out of range"):
        f(torch.tensor([-1, 2]), w)


@pytest.mark.parametrize("target", TARGETS)
def test_training_through_embedding(target):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(30, 16, padding_idx=0), torch.nn.LayerNorm(16))
    ids = torch.tensor([[0, 3, 5, 3], [7, 0, 29, 1]])
    torch._dynamo.reset()
    c = torch.compile(m, backend="kiln", options={"target": target})
    c(ids).square().sum().backward()
    got = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m(ids).square().sum().backward()
    for g, r in zip(got, [p.grad for p in m.parameters()]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert got[0][0].abs().sum() == 0           # padding_idx's row gets no gradient


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("rows", [(0, 8, 1), (3, 11, 1), (2, 17, 3)])
def test_position_embedding_rows_are_a_slice(target, rows):
    """``embedding(w, arange(..))`` (a position embedding) is a slice of the weight: no gather
    kernel, no index tensor held as a constant; the values are eager's."""
    w = torch.randn(20, 16)

    def f(x, w):
        pos = torch.arange(*rows).unsqueeze(0)
        return x + F.embedding(pos, w)
    x = torch.randn(2, len(range(*rows)), 16)
    got, kinds = _run(f, x, w, target=target)
    torch.testing.assert_close(got, f(x, w))
    assert "gather" not in [k for k, _ in kinds]


def test_rows_past_the_table_still_raise():
    """An arange reaching past the weight's rows stays a gather: eager raises, a slice would clamp."""
    w = torch.randn(6, 4)
    f = kiln.compile(lambda w: F.embedding(torch.arange(4, 8), w), target="cpu")
    with pytest.raises(IndexError, match="out of range"):
        f(w)

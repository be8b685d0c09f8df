"""as_strided's storage offset counts from the start of its source's storage. A source kiln
placed in the arena starts wherever its buffer does, so the runtime must move the offset by the
buffer's place (GPT-2's backward builds its fused-QKV gradient with as_strided over a zero
buffer: wrong gradients when that buffer was no longer a folded constant)."""
import pytest
import torch


def f(x):
    a = torch.sin(x)
    b = (a * 2).sum(-1, keepdim=True) + x       # a and b live in the arena at once
    c = torch.cos(b) * 3
    w = torch.as_strided(c, (4, 6), (12, 2), 5)
    return w * a[:4, :6] + 1


@pytest.mark.parametrize("target", ["cpu", "triton"])
def test_as_strided_of_an_arena_value(target):
    torch._dynamo.reset()
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    got = torch.compile(f, backend="kiln", options={"target": target})(x)
    torch.testing.assert_close(got, f(x))


def test_as_strided_without_offset_keeps_the_sources():
    def g(x):
        c = torch.cos(torch.sin(x) * 2 + x)
        return torch.as_strided(c[2:], (3, 4), (12, 1)) * 2
    torch._dynamo.reset()
    x = torch.randn(16, 12)
    torch.testing.assert_close(torch.compile(g, backend="kiln", options={"target": "cpu"})(x), g(x))


def h(x, y):
    a = torch.sin(y) * 2                        # placed in the arena first
    buf = torch.cos(x) + a.sum()                # the scatter's target: a slice of the arena
    out = torch.as_strided_scatter(buf, torch.tanh(y[:4, :6]), (4, 6), (12, 2), 5)
    return out * 3 + a


@pytest.mark.parametrize("target", ["cpu", "triton"])
def test_as_strided_scatter_into_an_arena_value(target):
    """ATen's as_strided_scatter clones the whole storage under its input and counts the offset
    from that storage's start: over an arena slice it copied the arena and wrote its first
    elements (GPT-2's fused-QKV gradient came out zero in arena mode)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g)
    got = torch.compile(h, backend="kiln", options={"target": target})(x, y)
    torch.testing.assert_close(got, h(x, y))

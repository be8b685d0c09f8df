"""State across calls on a real GPU, with kiln's CUDA-graph replay forced on and left to its
policy (skipped without CUDA): buffers a forward writes (a counter, a KV cache), weights changed
between calls, random numbers and dropout masks that must differ call to call, optimizer steps,
outputs that must survive the next call. Each matched eager in a probe on an H200 (bench/RESULTS.md,
tenth session) before it became a test."""
import copy

import pytest
import torch

import kiln
from frontdoor.factories import Counter  # the name pytest gives it (tests/ is on the path)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
MODES = pytest.mark.parametrize("target, cg", [(t, c) for t in ("triton", "cuda") for c in (True, "auto")])
ac = torch.testing.assert_close


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    yield


@MODES
def test_weights_changed_between_calls(target, cg):
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4)).cuda()
    f = kiln.compile(m, target=target, cudagraphs=cg)
    x = torch.randn(5, 8, device="cuda")
    with torch.no_grad():
        for _ in range(5):
            ac(f(x), m(x))
        m[0].weight.add_(0.5)
        m[2].bias.mul_(-2)
        for _ in range(2):
            ac(f(x), m(x))


@MODES
def test_outputs_survive_later_calls(target, cg):
    fn = lambda x: (torch.softmax(x, -1) * 2, (x + 1).sum(-1))  # noqa: E731
    f = kiln.compile(fn, target=target, cudagraphs=cg)
    xs = [torch.randn(6, 10, device="cuda") for _ in range(6)]
    ys = [f(x) for x in xs]
    for x, y in zip(xs, ys):
        for a, b in zip(y, fn(x)):
            ac(a, b)


class _Cache(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(2, 8, 4))

    def forward(self, x, pos):
        self.cache.index_copy_(1, pos, x[:, None])
        return torch.softmax(self.cache, -1).sum(1) * 2


@MODES
def test_buffers_written_by_forward(target, cg):
    m, e = Counter().cuda(), Counter().cuda()
    f = kiln.compile(m, target=target, cudagraphs=cg)
    x = torch.randn(3, device="cuda")
    for _ in range(6):
        ac(f(x), e(x))
    ac(m.n, e.n)
    m, e = _Cache().cuda(), _Cache().cuda()
    f = kiln.compile(m, target=target, cudagraphs=cg)
    for p in range(7):
        x, pos = torch.randn(2, 4, device="cuda"), torch.tensor([p], device="cuda")
        ac(f(x, pos), e(x, pos))
    ac(m.cache, e.cache)


@MODES
def test_random_numbers_and_dropout_differ_per_call(target, cg):
    f = kiln.compile(lambda x: x + torch.rand_like(x), target=target, cudagraphs=cg)
    x = torch.zeros(4096, device="cuda")
    outs = [f(x) for _ in range(6)]
    for a, b in zip(outs, outs[1:]):
        assert not torch.equal(a, b)
    assert 0.45 < float(outs[-1].mean()) < 0.55
    m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(0.5)).cuda().train()
    f = kiln.compile(m, target=target, cudagraphs=cg)
    x = torch.randn(64, 16, device="cuda")
    masks = [f(x).detach() == 0 for _ in range(5)]
    for a, b in zip(masks, masks[1:]):
        assert not torch.equal(a, b)


@MODES
def test_optimizer_steps_match_eager(target, cg):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                            torch.nn.Linear(32, 4)).cuda()
    e = copy.deepcopy(m)
    om, oe = torch.optim.Adam(m.parameters(), 1e-2), torch.optim.Adam(e.parameters(), 1e-2)
    f = kiln.compile(m, target=target, cudagraphs=cg)
    for _ in range(6):
        x = torch.randn(32, 16, device="cuda")
        for mod, opt in ((f, om), (e, oe)):
            opt.zero_grad()
            mod(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(m.parameters(), e.parameters()):
        ac(a, b, rtol=1e-3, atol=1e-4)

"""CUDA graph replay of training graphs (skipped without CUDA): forward and backward replay in a
plain training loop and match eager; a forward's saved outputs stay intact while something still
holds them (two forwards before a backward); "auto" leaves a training graph that would hold much
memory unreplayed. (AOTAutograd refuses ``retain_graph`` on graphs with donated buffers.)"""
import copy
import gc

import pytest
import torch

import kiln

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ac = torch.testing.assert_close


def _runners(before=()) -> list:
    from kiln.runtime.cudagraphs import live_runners
    gc.collect()
    old = {id(o) for o in before}
    return [r for r in live_runners() if id(r) not in old]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                               torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).cuda()


def _train(f, steps: int, rows: int = 24) -> None:
    """``steps`` training steps of ``f`` on fresh inputs (a sum as the loss), no optimizer."""
    for _ in range(steps):
        f(torch.randn(rows, 16, device="cuda")).sum().backward()


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    yield


@pytest.mark.timing         # "auto" times warm-up calls
@pytest.mark.parametrize("cg", [True, "auto"])
def test_training_loop_replays_forward_and_backward(cg):
    before = _runners()
    m = _model()
    e = copy.deepcopy(m)
    om, oe = torch.optim.SGD(m.parameters(), 0.1), torch.optim.SGD(e.parameters(), 0.1)
    f = kiln.compile(m, target="triton", cudagraphs=cg)
    outs = {f: [], e: []}
    for _ in range(8):
        x = torch.randn(24, 16, device="cuda")
        for mod, opt in ((f, om), (e, oe)):
            opt.zero_grad()
            out = mod(x)
            out.square().mean().backward()
            opt.step()
            outs[mod].append(out)           # each step's output outlives the later calls
    for a, b in zip(outs[f], outs[e]):
        ac(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(m.parameters(), e.parameters()):
        ac(a, b, rtol=1e-4, atol=1e-5)
    runners = [r for r in _runners(before) if r.training]
    assert len(runners) == 2, [r.describe() for r in runners]
    for r in runners:
        assert r.cg is not None, r.describe()
        assert r.unreplayed == 0 and r.captures == 1, (r.unreplayed, r.captures)
    fw = next(r for r in runners if r.saved_from is not None)
    assert fw.handed_ptrs                                  # the backward read the saved outputs in place
    bw = next(r for r in runners if r is not fw)
    assert any(bw.pooled)


def test_saved_outputs_survive_a_second_forward():
    """Two forwards before one backward (summed losses): the second must not overwrite what the
    first saved; then the plain loop replays again."""
    before = _runners()
    m = _model()
    e = copy.deepcopy(m)
    f = kiln.compile(m, target="triton", cudagraphs=True)
    _train(f, 5)                        # warm up and capture
    m.zero_grad()
    x1, x2 = torch.randn(24, 16, device="cuda"), torch.randn(24, 16, device="cuda")
    (f(x1).square().sum() + f(x2).tanh().sum()).backward()
    (e(x1).square().sum() + e(x2).tanh().sum()).backward()
    for a, b in zip(m.parameters(), e.parameters()):
        ac(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    fw = next(r for r in _runners(before) if r.training and r.saved_from is not None)
    assert fw.unreplayed >= 1
    m.zero_grad()
    e.zero_grad()
    x = torch.randn(24, 16, device="cuda")
    f(x).sum().backward()
    e(x).sum().backward()
    for a, b in zip(m.parameters(), e.parameters()):
        ac(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_auto_leaves_a_training_graph_that_would_hold_much_memory(monkeypatch):
    from kiln.runtime import cudagraphs
    monkeypatch.setattr(cudagraphs, "TRAIN_HOLD_BYTES", 0)
    before = _runners()
    m = _model()
    f = kiln.compile(m, target="triton")
    _train(f, 6)
    runners = [r for r in _runners(before) if r.training]
    assert runners and all(r.cg is None and r.launch_bound is False for r in runners)
    assert "too much memory" in runners[0].describe()


def test_weights_moved_capture_both_graphs_again():
    """A weight at a new address (``.data`` replaced) makes the forward capture again, its saved
    outputs move with it, and the backward follows them."""
    before = _runners()
    m = _model()
    e = copy.deepcopy(m)
    f = kiln.compile(m, target="triton", cudagraphs=True)
    _train(f, 5)
    m[0].weight.data = m[0].weight.data.clone()
    for _ in range(3):
        m.zero_grad()
        e.zero_grad()
        x = torch.randn(24, 16, device="cuda")
        f(x).square().sum().backward()
        e(x).square().sum().backward()
        for a, b in zip(m.parameters(), e.parameters()):
            ac(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    runners = [r for r in _runners(before) if r.training]
    assert all(r.captures == 2 and r.unreplayed == 0 for r in runners), [(r.captures, r.unreplayed) for r in runners]


def test_gpt2_training_replayed_matches_eager():
    """A real model's training loop (GPT-2 from a small random config, AdamW) replayed: the
    per-step losses follow eager's."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=8, vocab_size=1024, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = transformers.GPT2LMHeadModel(cfg).cuda()
    e = copy.deepcopy(m)
    before = _runners()
    f = kiln.compile(m, target="triton", cudagraphs=True)
    om, oe = torch.optim.AdamW(m.parameters(), 1e-3), torch.optim.AdamW(e.parameters(), 1e-3)
    g = torch.Generator("cuda").manual_seed(0)
    for _ in range(7):
        ids = torch.randint(0, 1024, (2, 64), device="cuda", generator=g)
        losses = []
        for mod, opt in ((f, om), (e, oe)):
            opt.zero_grad(set_to_none=True)
            loss = mod(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(float(loss))
        assert abs(losses[0] - losses[1]) <= 1e-3 * abs(losses[1]), losses
    runners = [r for r in _runners(before) if r.training]
    assert runners and all(r.cg is not None and r.unreplayed == 0 for r in runners), \
        [(r.describe(), r.unreplayed) for r in runners]


@pytest.mark.timing         # "auto" times warm-up calls
def test_auto_cap_counts_every_replayed_training_graph(monkeypatch):
    """One replayed pair per input shape: a second shape's graphs stay unreplayed when the pairs
    together would hold more than the cap."""
    from kiln.runtime import cudagraphs
    before = _runners()
    m = _model()
    f = kiln.compile(m, target="triton")
    _train(f, 6)
    first = [r for r in _runners(before) if r.training]
    assert first and all(r.cg is not None for r in first), [r.describe() for r in first]
    monkeypatch.setattr(cudagraphs, "TRAIN_HOLD_BYTES", sum(r.held for r in first) + 1)
    _train(f, 6, rows=40)
    second = [r for r in _runners(before) if r.training and r not in first]
    assert second and all(r.cg is None and r.launch_bound is False for r in second), [r.describe() for r in second]


def test_inference_graph_beside_training_captures_again_when_a_weight_moves():
    """The training forward saves weights for its backward; they are the caller's, not handed out
    by replay, so the same model's inference graph (which takes them as inputs) treats a moved
    weight as any moved input: it captures again instead of running unreplayed from then on."""
    before = _runners()
    m = _model()
    e = copy.deepcopy(m)
    f = kiln.compile(m, target="triton", cudagraphs=True)
    _train(f, 5)
    x = torch.randn(24, 16, device="cuda")
    with torch.no_grad():
        for _ in range(4):
            f(x)
    fw = next(r for r in _runners(before) if r.training and r.saved_from is not None)
    weights = {p.data_ptr() for p in m.parameters()}
    assert not (fw.handed_ptrs & weights)
    m[0].weight.data = m[0].weight.data.clone()
    e[0].weight.data = e[0].weight.data.clone()
    with torch.no_grad():
        for _ in range(3):
            ac(f(x), e(x), rtol=1e-4, atol=1e-5)
    inf = [r for r in _runners(before) if not r.training]
    assert len(inf) == 1 and inf[0].captures == 2 and inf[0].unreplayed == 0, \
        [(r.captures, r.unreplayed) for r in inf]

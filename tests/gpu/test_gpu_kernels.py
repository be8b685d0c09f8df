"""Generated Triton kernels on a real GPU against eager (skipped without CUDA)."""
import pytest
import torch

import kiln

pytestmark = pytest.mark.gpu
F = torch.nn.functional
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _check(fn, *args, rtol=1e-2, atol=1e-2, target="triton"):
    torch._dynamo.reset()
    got = kiln.compile(fn, target=target)(*args)
    ref = fn(*args)
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol, equal_nan=True)
    rep = kiln.last_report()
    assert any(k["target"] == target for k in rep.kernels)


@needs_cuda
@pytest.mark.parametrize("target", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 33), (64, 4096), (8, 20000)])
def test_norms_softmax(dtype, shape, target):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    w = torch.randn(shape[-1], device="cuda", dtype=dtype)
    _check(lambda x, w: (torch.softmax(x, -1), F.layer_norm(x, (shape[-1],), w, w),
                         x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(dtype) * w,
                         torch.log_softmax(x.float(), -1), x.sum(0), x.amax(-1)), x, w, target=target)


@needs_cuda
@pytest.mark.parametrize("target", ["triton", "cuda"])
def test_pointwise_broadcast_and_big_rows(target):
    x = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    _check(lambda x, b: F.gelu(x + b) + x.t().contiguous().t(), x, b, rtol=2e-2, atol=2e-2, target=target)  # bf16: 1-2 ulp


@needs_cuda
def test_training_step_matches_eager():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.LayerNorm(128),
                            torch.nn.Linear(128, 10)).cuda()
    x = torch.randn(32, 64, device="cuda")
    cm = torch.compile(m, backend=kiln.kiln_backend, options={"target": "triton"})
    cm(x).logsumexp(-1).sum().backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m(x).logsumexp(-1).sum().backward()
    for a, b in zip(g1, [p.grad for p in m.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@needs_cuda
@pytest.mark.parametrize("target", ["triton", "cuda"])
def test_integer_bool_nan_ops(target):
    i = torch.randint(-50, 50, (33, 65), device="cuda")
    x = torch.randn(33, 65, device="cuda")
    x[0, 0] = float("nan")
    _check(lambda i, x: ((i // 7) % 5 + (i > 2), (i > 0).all(-1), x.amax(-1), x.sum(0),
                         torch.where(x > 0, x, -x).pow(2.5), torch.isnan(x) | (x > 1)), i, x, target=target)


@needs_cuda
@pytest.mark.parametrize("target", ["triton", "cuda"])
def test_misaligned_inputs_after_aligned_ones(target):
    """Kernels are specialised for their first inputs' 16-byte alignment and later launched
    directly; a view starting mid-way into its storage (same sizes and strides, so the same
    Dynamo guards) must not reach the aligned variant."""
    torch._dynamo.reset()
    fn = lambda x, y: torch.softmax(x, -1) * 2 + y     # noqa: E731
    f = kiln.compile(fn, target=target)
    a, b = torch.randn(5, 3, device="cuda"), torch.randn(5, 3, device="cuda")
    for _ in range(3):
        torch.testing.assert_close(f(a, b), fn(a, b))
    big = torch.randn(7, 3, device="cuda")
    for x, y in ((big[1:6], b), (a, big[2:])):       # 12- and 24-byte offsets
        assert x.data_ptr() % 16 or y.data_ptr() % 16
        torch.testing.assert_close(f(x, y), fn(x, y))
    torch.testing.assert_close(f(a, b), fn(a, b))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_embedding_gather_kernel(dtype):
    """aten.embedding as kiln's Triton row gather: a wide table (several column blocks), int32
    and int64 indices, a transposed weight, and a layer norm after it."""
    w = torch.randn(32000, 2560, device="cuda", dtype=dtype)
    for ids in (torch.randint(0, 32000, (4, 333), device="cuda"),
                torch.randint(0, 32000, (7,), device="cuda", dtype=torch.int32)):
        _check(lambda i, w: F.layer_norm(F.embedding(i, w), (2560,)), ids, w)
        assert any(k["kind"] == "gather" for k in kiln.last_report().kernels)
    wt = torch.randn(2560, 1000, device="cuda", dtype=dtype).t()
    ids = torch.randint(0, 1000, (3, 50), device="cuda")
    torch._dynamo.reset()
    assert torch.equal(kiln.compile(F.embedding, target="triton")(ids, wt), F.embedding(ids, wt))


@needs_cuda
def test_launch_hooks_see_kiln_launches():
    """Kernels launch through Triton's launcher directly unless a launch hook is set (Triton 3.6+
    keeps an empty HookChain there by default, which is no hook); a hook added later sees them."""
    from triton import knobs
    torch._dynamo.reset()
    fn = lambda x: torch.softmax(x, -1) * 2        # noqa: E731
    f = kiln.compile(fn, target="triton", cudagraphs=False)
    x = torch.randn(64, 64, device="cuda")
    for _ in range(3):
        torch.testing.assert_close(f(x), fn(x))
    seen = []
    hook = lambda *a, **k: seen.append(1)           # noqa: E731
    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):
        chain.add(hook)
    else:
        knobs.runtime.launch_enter_hook = hook
    try:
        torch.testing.assert_close(f(x), fn(x))
        torch.cuda.synchronize()
    finally:
        if hasattr(chain, "remove"):
            chain.remove(hook)
        else:
            knobs.runtime.launch_enter_hook = chain
    assert seen


@needs_cuda
@pytest.mark.parametrize("target", ["triton", "cuda"])
def test_exact_float_remainder_signed_zeros_pow_zero(target):
    """remainder/fmod exact as eager's (libdevice fmod in Triton), floor division from them (1 // 0.1
    = 9), x ** 0 = 1 for NaN, round(-0.4) = -0.0, 1 / (x + 0) = +inf for x = -0.0, and signed zeros
    through negation and constants (Triton 3.6 compiles `-x` as `0 - x`; older versions make a
    constant -0.0 +0.0)."""
    a = torch.tensor([12345678.0, 1e7 + 3, 7.5, -7.5, 1e-3, -0.0, 5.0, float("inf"), -3.0], device="cuda")
    b = torch.tensor([0.1, 3.0, 2.0, 2.0, 7.0, 3.0, float("inf"), 2.0, float("inf")], device="cuda")
    fn = lambda a, b: (torch.remainder(a, b), torch.fmod(a, b), torch.remainder(a.double(), 0.3),  # noqa: E731
                       a.pow(0.0), torch.round(a * 0 - 0.4), 1 / (a * 0 - 0.0 + 0), a // b, a.double() // 0.1,
                       (a * 0 + 1) // 0.1, torch.neg(b * 0), torch.where(a > 1e30, a, -0.0), -a // 7)
    torch._dynamo.reset()
    got, want = kiln.compile(fn, target=target)(a, b), fn(a, b)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(torch.signbit(g[~w.isnan()]), torch.signbit(w[~w.isnan()])), (g, w)
    assert any(k["target"] == target for k in kiln.last_report().kernels)


@needs_cuda
@pytest.mark.parametrize("target", ["triton", "cuda"])
def test_fp32_division_and_sqrt_round_as_eager(target):
    """Divisions a rounding op reads, and roots, round as eager's: Triton's fp32 `/` (div.full.f32)
    and tl.sqrt (sqrt.approx) could put floor(a / b) or floor(sqrt(n * n)) one below eager's. A
    constant divisor is a multiply by its reciprocal, as eager's CUDA kernels divide ((a / 7).floor()
    differed on 8% of these values when kiln divided exactly)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    b = torch.randint(1, 1000, (1 << 16,), device="cuda", generator=g).float()
    a = b * torch.randint(-1000, 1000, (1 << 16,), device="cuda", generator=g).float()
    fn = lambda a, b: (torch.floor(a / b), torch.div(a, b, rounding_mode="trunc"), torch.floor((b * b).sqrt()),  # noqa: E731
                       (a / 7).floor(), a / b, 1 / b, torch.log1p(b * 1e-7), torch.expm1(b * -1e-7), torch.tanh(b * 1e-6))
    torch._dynamo.reset()
    got, want = kiln.compile(fn, target=target)(a, b), fn(a, b)
    for i, (x, y) in enumerate(zip(got, want)):
        if i < 4:
            assert torch.equal(x, y), (i, (x != y).sum())
        else:       # a plain division may be Triton's (within 2 ulp), as Inductor's kernels divide
            torch.testing.assert_close(x, y, rtol=2e-6, atol=0)


@needs_cuda
@pytest.mark.parametrize("target", ["triton", "cuda"])
def test_cpu_scalar_tensors_next_to_cuda_operands(target):
    """Eager takes 0-d CPU tensors with CUDA operands (a constant made in the function, or an
    argument, even the first); kiln's kernels got their host pointers (Triton refused them, CUDA
    C read them: an illegal address), and a first CPU-scalar argument put the outputs on the CPU."""
    x = torch.randn(8, 16, device="cuda")
    s = torch.tensor(3.0)
    fn = lambda s, x: (x * torch.tensor(2.0) + s, torch.softmax(x * s, -1), torch.heaviside(x, torch.tensor(0.5)))  # noqa: E731
    torch._dynamo.reset()
    f = kiln.compile(fn, target=target)
    for _ in range(2):
        got, want = f(s, x), fn(s, x)
        for g_, w in zip(got, want):
            assert g_.device == w.device
            torch.testing.assert_close(g_, w)
    assert any(k["target"] == target for k in kiln.last_report().kernels)


@needs_cuda
@pytest.mark.parametrize("target", ["triton", "cuda"])
def test_constants_made_under_a_cuda_default_device(target):
    """A tensor made inside the compiled function under ``torch.set_default_device("cuda")`` is on
    the GPU in eager; it reached kiln's kernels as a CPU constant (Triton refused its pointer, CUDA
    C read an illegal address). And x ** 0.5 is sqrt, as in eager: sqrt(-0.0) is -0.0 (CUDA C's
    powf gave +0.0)."""
    cases = {"bce": lambda x: torch.nn.functional.binary_cross_entropy(x, torch.tensor([0.0, 1.0, 1.0]).expand(4, 3)),
             "vector": lambda x: x * torch.tensor([1.0, 2.0, 3.0]),
             "constants": lambda x: x * torch.tensor(2.0) + torch.tensor(0.5),
             "sqrt": lambda x: (x ** 0.5, (-x * 0) ** 0.5)}
    ran = []
    torch.set_default_device("cuda")
    try:
        x = torch.rand(4, 3) * 0.9 + 0.05
        for name, fn in cases.items():
            torch._dynamo.reset()
            try:        # Dynamo refuses some (a non-0-d constant stays on the CPU in its fake run): not kiln's
                torch.compile(fn, backend="eager")(x)
            except torch._dynamo.exc.TorchRuntimeError:
                continue
            torch._dynamo.reset()
            ran.append((name, kiln.compile(fn, target=target)(x), fn(x)))
    finally:
        torch.set_default_device(None)
    assert {"constants", "sqrt"} <= {name for name, _, _ in ran}
    for _, got, want in ran:
        for g_, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            assert g_.device == w.device
            torch.testing.assert_close(g_, w)
            assert torch.equal(g_.signbit(), w.signbit())


@needs_cuda
@pytest.mark.parametrize("target", ["triton", "cuda"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_over_a_vocabulary(target, reduction):
    """An LM head's loss over bf16 logits (rows of 32003: looped, ragged): the gather moves ahead
    of the log-softmax (passes/gather_sink.py), so only row statistics are computed; ignored
    targets and the mean over the rest as eager."""
    torch.manual_seed(0)
    x = torch.randn(96, 32003, device="cuda", dtype=torch.bfloat16) * 3
    t = torch.randint(0, 32003, (96,), device="cuda")
    t[::7] = -100
    fn = lambda x, t: torch.nn.functional.cross_entropy(x.float(), t, reduction=reduction)  # noqa: E731
    torch._dynamo.reset()
    got, want = kiln.compile(fn, target=target)(x, t), fn(x, t)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@needs_cuda
@pytest.mark.parametrize("target", ["triton", "cuda"])
def test_cross_entropy_training_step(target):
    """The loss and its gradient over a vocabulary (the backward's scatter as a one-hot
    comparison, passes/one_hot.py; ignored targets) against eager."""
    torch.manual_seed(0)
    x0 = torch.randn(64, 32003, device="cuda") * 3
    t = torch.randint(0, 32003, (64,), device="cuda")
    t[::5] = -100
    fn = lambda x, t: torch.nn.functional.cross_entropy(x, t)  # noqa: E731
    out = []
    for f in (kiln.compile(fn, target=target), fn):
        torch._dynamo.reset()
        x = x0.clone().requires_grad_()
        loss = f(x, t)
        loss.backward()
        out.append((loss.detach(), x.grad))
    (loss, grad), (want_loss, want_grad) = out
    torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad, want_grad, rtol=2e-5, atol=1e-7)

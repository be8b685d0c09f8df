"""Generated kernels compute what eager computes, edge cases included (each test names a wrong
answer kiln once gave): no fast-math algebra in numba kernels (function-wide ``reassoc`` turned
``x * 0 + x`` into ``x`` and ``(x + 1) - x`` into 1, ``arcp`` made a division by a tiny row sum a
multiply by an overflowing reciprocal, ``nsz`` lost -0.0); only the reductions' accumulating add
and multiply may reassociate (numba_math._radd/_rmul), which vectorises sums and products. Float
remainder, fmod and floor division are ATen's (from the exact fmod); log1p, expm1, tanh and sinh
hold for small x; integer division is exact at the dtype's minimum; ``bool + bool`` is a logical or; ``x ** 0`` is 1 for NaN; integer
division by zero raises on the cpu target as eager's CPU kernels do."""
import pytest
import torch

import kiln

TARGETS = ["cpu", "triton"]
X = torch.tensor([[1.0, float("nan"), 2.0, 3e8], [float("inf"), -1.0, 0.0, float("-inf")]])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("fn", [
    lambda x: x * 0 + x,
    lambda x: (x + 1) - x,
    lambda x: (x * 0 + x).amax(-1),
    lambda x: (x * 0 + x).sum(-1),
    lambda x: ((x + 1) - x).sum(-1) + (x - x).prod(-1),
], ids=["x*0+x", "(x+1)-x", "amax", "sum", "sum+prod"])
def test_no_algebra_on_inf_nan_or_rounding(target, fn):
    torch._dynamo.reset()
    got = kiln.compile(fn, target=target)(X)
    torch.testing.assert_close(got, fn(X), equal_nan=True, rtol=0, atol=0)
    assert any(k["target"] != "aten" for k in kiln.last_report().kernels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_sums_and_products_still_match(dtype):
    x = torch.randn(37, 1000, dtype=dtype)
    torch._dynamo.reset()
    got = kiln.compile(lambda x: (x.sum(-1), (1 + x * 1e-3).prod(-1), x.mean(0)), target="cpu")(x)
    want = (x.sum(-1), (1 + x * 1e-3).prod(-1), x.mean(0))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("target", TARGETS)
def test_division_is_a_division(target):
    x = torch.full((2, 4), 1e-39)
    x[1] = torch.tensor([1e-40, 2e-40, 3e-40, 4e-40])     # the row sum's reciprocal overflows fp32
    y, d = torch.randn(3, 1000), torch.tensor([3.0])
    torch._dynamo.reset()
    got = kiln.compile(lambda x, y, d: (x / x.sum(-1, keepdim=True), y / d), target=target)(x, y, d)
    torch.testing.assert_close(got[0], x / x.sum(-1, keepdim=True))
    assert torch.equal(got[1], y / d)                   # IEEE division, as eager: not x * (1 / d)


@pytest.mark.parametrize("target", TARGETS)
def test_signed_zeros_and_pow_zero(target):
    """No ``nsz``: x + 0 is +0.0 for x = -0.0 (1 / (x + 0) is +inf, as eager); round(-0.4) is -0.0;
    x ** 0 is 1 for NaN and inf too; -(+0.0) and a constant -0.0 are -0.0 (Triton 3.6 compiles `-x`
    as `0 - x`, older versions every constant zero as +0.0: kiln negates by a multiply)."""
    x = torch.tensor([-0.0, 0.0, -0.4, float("nan"), float("inf"), -2.5])

    def fn(x):
        return 1 / (x + 0), torch.round(x), x.pow(0.0), torch.neg(x * 0), x * 0 - 0.0, torch.where(x > 9, x, -0.0)
    torch._dynamo.reset()
    got, want = kiln.compile(fn, target=target)(x), fn(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(torch.signbit(g[~w.isnan()]), torch.signbit(w[~w.isnan()]))


A = torch.tensor([12345678.0, 1e7 + 3, 7.5, -7.5, 1e-3, -0.0, 5.0, float("inf"), -3.0, 2.0 ** 100])
B = torch.tensor([0.1, 3.0, 2.0, 2.0, 7.0, 3.0, float("inf"), 2.0, float("inf"), 3.0])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_remainder_and_fmod_are_exact(target, dtype):
    """Both as eager computes them (fmod exact, remainder = fmod moved to the divisor's sign):
    a - floor(a / b) * b was off by whole multiples of b for large quotients (0.216 for
    remainder(12345678, 0.1), eager 0.016)."""
    a, b = A.to(dtype), B.to(dtype)

    def fn(a, b):
        return torch.remainder(a, b), torch.fmod(a, b), torch.remainder(a, 0.3)
    torch._dynamo.reset()
    got, want = kiln.compile(fn, target=target)(a, b), fn(a, b)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(torch.signbit(g), torch.signbit(w))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_floor_division_is_atens(target, dtype):
    """Floor division of floats as ATen computes it, from the exact fmod: floor(a / b) gave
    1 // 0.1 = 10 and 7 // 0.1 = 70 (eager 9 and 69: 0.1 is a little over a tenth) and inf // x
    = inf (eager NaN)."""
    a = torch.tensor([1.0, 7.0, -1.0, 0.3, 1e30, 5.0, -0.0, float("inf"), -7.0, -0.5, 0.5, 0.0, float("nan")], dtype=dtype)
    b = torch.tensor([0.1, 0.1, 0.1, 0.1, 3.0, -0.0, 2.0, 1e-30, 2.0, 3.0, -3.0, -1.0, 1.0], dtype=dtype)

    def fn(a, b):
        return a // b, torch.div(a, b, rounding_mode="floor"), torch.floor_divide(a, 0.1), (a + 1) // (b * 2)
    torch._dynamo.reset()
    got, want = kiln.compile(fn, target=target)(a, b), fn(a, b)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(torch.signbit(g[~w.isnan()]), torch.signbit(w[~w.isnan()]))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log1p_expm1_tanh_sinh_keep_small_arguments(target, dtype):
    """These exist for small x: the Triton kernels computed log(1 + x) past |x| = 1e-4, which
    loses x's low bits to the rounding of 1 + x (1.7e-4 relative error at x = 2e-4), and tanh as
    1 - 2 / (exp(2x) + 1), sinh as (exp(x) - exp(-x)) / 2 (1e-2 relative error at 1e-5)."""
    x = torch.tensor([1e-8, 2e-4, 5e-4, 3e-3, 0.01, 0.3, -0.5, -0.0, 5.0, -1.0, float("inf"), float("-inf"),
                      -2.0, 80.0, -80.0], dtype=dtype)

    def fn(x):
        return (torch.log1p(x), torch.expm1(x), torch.nn.functional.softplus(x - 8), torch.tanh(x), torch.sinh(x),
                torch.tanh(x * 1e-3), torch.tanh(-x / 7))
    torch._dynamo.reset()
    got, want = kiln.compile(fn, target=target)(x), fn(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=1e-38)
        assert torch.equal(torch.signbit(g[~w.isnan()]), torch.signbit(w[~w.isnan()]))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8])
def test_integer_division_is_exact_at_the_extremes(target, dtype):
    """Integer //, trunc division, % and fmod as eager's, the dtype's minimum included: the
    helpers divided absolute values, and abs(-128) is -128 in int8 (-128 // 3 gave 42)."""
    lo, hi = torch.iinfo(dtype).min, torch.iinfo(dtype).max
    if dtype == torch.uint8:
        a, b = torch.tensor([250, 7, 9, 255, 0, 13], dtype=dtype), torch.tensor([7, 2, 4, 16, 3, 5], dtype=dtype)
    else:
        a = torch.tensor([-7, 7, -9, 9, lo, hi, -1, 5], dtype=dtype)
        b = torch.tensor([2, -2, 4, -4, 3, 7, 3, -3], dtype=dtype)

    def fn(a, b):
        return (a // b, torch.div(a, b, rounding_mode="trunc"), a % b, torch.fmod(a, b), a // 3, a % 3,
                torch.fmod(a, 5))
    torch._dynamo.reset()
    got, want = kiln.compile(fn, target=target)(a, b), fn(a, b)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), (g, w)


def test_float_remainder_kernels_compile_for_sm90():
    """libdevice's fmod takes one dtype for both operands: a constant operand (remainder(x, 0.3) or
    x // 0.1 on fp64) must reach it as a scalar of that dtype; and Triton refuses // between uint8
    and an int32 literal (u // 7 did not compile on a GPU; the interpreter took it). Compiled to PTX
    here, no GPU needed."""
    from test_triton_ptx import _model_jobs, _ptx

    def model(a, b, c, u):
        return (torch.remainder(a, b), torch.fmod(a, 3.0), torch.remainder(c, 0.3), torch.remainder(0.7, c), -a,
                torch.where(a > 0, a, -0.0), c * -0.0,
                a // b, c // 0.1, u // 7 + u % 3, torch.log1p(a) + torch.expm1(a) + torch.tanh(a),
                torch.log1p(c) + torch.expm1(c) + torch.tanh(c) + torch.sinh(c))
    jobs = _model_jobs(model, torch.randn(4, 16), torch.randn(16), torch.randn(4, 16, dtype=torch.float64),
                       torch.arange(64, dtype=torch.uint8).reshape(4, 16))
    assert any("tl.full([], 0.3, tl.float64)" in j["source"] for j in jobs)
    assert len(_ptx(jobs)) == len(jobs)        # every kernel compiled (a failure fails the helper)


@pytest.mark.parametrize("target", TARGETS)
def test_bool_add_is_logical_or(target):
    """bool + bool is torch's logical or; as 1-bit integers Triton wrapped True + True to False."""
    x = torch.randn(4, 6)

    def fn(x):
        return ((x > 0) + (x < 1)).sum(-1), (x > 0) + True, ((x > 0) * (x < 1)).sum(-1)
    torch._dynamo.reset()
    for g, w in zip(kiln.compile(fn, target=target)(x), fn(x)):
        assert torch.equal(g, w)


@pytest.mark.parametrize("fn", [lambda a, b: a // b, lambda a, b: a % b, lambda a, b: torch.fmod(a, b),
                                lambda a, b: torch.div(a, b, rounding_mode="trunc")],
                         ids=["floordiv", "remainder", "fmod", "trunc"])
def test_cpu_integer_division_by_zero_raises_as_eager(fn):
    """Eager's CPU kernels raise on an integer division by zero; numba's error model returned 0."""
    a, b = torch.tensor([5, 6, -7]), torch.tensor([2, 0, 3])
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        fn(a, b)
    torch._dynamo.reset()
    f = kiln.compile(fn, target="cpu")
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        f(a, b)
    ok = torch.tensor([2, -4, 3])
    assert torch.equal(f(a, ok), fn(a, ok))

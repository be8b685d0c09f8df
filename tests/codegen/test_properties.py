"""Property tests: random pointwise chains over broadcast shapes, optionally ending in a
reduction over random dims (keepdim or not) with a broadcast epilogue, compiled by kiln and
compared with eager. cpu target at small shapes; triton (the interpreter without a GPU) at tiny
shapes with fewer examples. Example counts are kept modest: every example is a new kernel."""
from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

import kiln
from kiln.api import compile_graph
from kiln.ir.capture import from_fx
from kiln.ir.decompose import decomposition_table

# range-safe ops: nothing overflows or leaves the reals for inputs in [-3, 3] chained a few times
UNARY = {
    "neg": torch.neg, "abs": torch.abs, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "sin": torch.sin,
    "relu": torch.relu, "exp": lambda x: torch.exp(x.clamp(-5, 5)), "sq": lambda x: x * x,
    "log1p_abs": lambda x: torch.log1p(x.abs()), "sqrt_abs": lambda x: torch.sqrt(x.abs() + 0.5),
    "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu, "scale": lambda x: x * 0.5 + 1.0,
    # views inside a group, and reductions mid-chain (several reductions: group boundaries)
    "transposed": lambda x: (x.transpose(0, -1) * 2).transpose(0, -1),
    "unsqueezed": lambda x: (x.unsqueeze(0) + 1).squeeze(0),
    "row_centred": lambda x: x - x.mean(-1, keepdim=True),
    "col_max": lambda x: x - x.amax(0, keepdim=True),
    # slices and selects of computed values, broadcast back (once folded into a group as reshapes)
    "first_col": lambda x: x * (x * 2)[..., :1],
    "last_col": lambda x: x - (x + 1).narrow(-1, x.shape[-1] - 1, 1),
    "first_row": lambda x: x + (x * 0.5).select(0, 0),
    "first_col_softmax": lambda x: x * x.softmax(-1)[..., :1],
    # aranges read by a kernel (passes/iota.py computes them from the index): along the last dim,
    # and along the first through a view
    "col_index": lambda x: x * 0.25 * (torch.arange(x.shape[-1], device=x.device) + x.sign()),
    "row_index": lambda x: torch.where(
        torch.arange(x.shape[0], device=x.device).view(-1, *[1] * (x.dim() - 1)) < x * 2 + 1, x, x.abs() - 1),
}
BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "max": torch.maximum, "min": torch.minimum,
    "div": lambda a, b: a / (b.abs() + 1.0), "where": lambda a, b: torch.where(a > b, a, b * 2),
}
REDUCE = {"sum": torch.sum, "mean": torch.mean, "amax": torch.amax, "amin": torch.amin}


@st.composite
def programs(draw, max_dim):
    rank = draw(st.integers(1, 3))
    shape = draw(st.lists(st.integers(1, max_dim), min_size=rank, max_size=rank))
    n_in = draw(st.integers(1, 3))
    in_shapes = []
    for _ in range(n_in):                      # broadcastable variants: unit dims, fewer leading dims
        drop = draw(st.integers(0, rank - 1))
        s = [1 if draw(st.booleans()) and draw(st.booleans()) else d for d in shape[drop:]]
        in_shapes.append(s)
    in_shapes[0] = list(shape)                 # one input spans the whole space
    steps = []
    n_vals = n_in
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            steps.append(("u", draw(st.sampled_from(sorted(UNARY))), draw(st.integers(0, n_vals - 1))))
        else:
            steps.append(("b", draw(st.sampled_from(sorted(BINARY))), draw(st.integers(0, n_vals - 1)),
                          draw(st.integers(0, n_vals - 1))))
        n_vals += 1
    red = None
    if draw(st.booleans()):
        dims = draw(st.lists(st.integers(-rank, rank - 1), min_size=1, max_size=rank, unique_by=lambda d: d % rank))
        red = (draw(st.sampled_from(sorted(REDUCE))), dims, draw(st.booleans()), draw(st.booleans()))
    extra_out = draw(st.booleans())            # also return an intermediate value
    return in_shapes, steps, red, extra_out, draw(st.integers(0, 2**16))


def build(steps, red, extra_out):
    def fn(*xs):
        vals = list(xs)
        for s in steps:
            vals.append(UNARY[s[1]](vals[s[2]]) if s[0] == "u" else BINARY[s[1]](vals[s[2]], vals[s[3]]))
        out = vals[-1]
        res = []
        if red is not None:
            name, dims, keep, epilogue = red
            full = torch.broadcast_tensors(*vals)[-1]              # reduce over the whole space
            r = REDUCE[name](full, dim=dims, keepdim=keep)
            res.append(r)
            if epilogue and keep:
                res.append(full - r)                               # broadcast back (softmax-like)
        else:
            res.append(out)
        if extra_out:
            res.append(vals[len(vals) // 2] * 2)
        return tuple(res)
    return fn


def check(program, target):
    in_shapes, steps, red, extra_out, seed = program
    g = torch.Generator().manual_seed(seed)
    xs = [torch.rand(s, generator=g) * 6 - 3 for s in in_shapes]
    if target == "triton" and torch.cuda.is_available():       # a GPU: real Triton kernels
        xs = [x.cuda() for x in xs]
    fn = build(steps, red, extra_out)
    gm = make_fx(fn, decomposition_table=decomposition_table())(*xs)
    compiled, report = compile_graph(from_fx(gm), kiln.Options(target=target), verify=True)
    got, want = compiled(*xs), fn(*xs)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert report.fallback_ops == [], report.fallback_ops


# KILN_PROPERTY_SCALE=10 (say) runs ten times the examples, randomised, for a longer hunt
SCALE = float(os.environ.get("KILN_PROPERTY_SCALE", "1"))
COMMON = dict(deadline=None, derandomize=SCALE == 1,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=int(30 * SCALE), **COMMON)
@given(programs(max_dim=7))
def test_random_programs_cpu(program):
    check(program, "cpu")


@settings(max_examples=int(25 * SCALE), **COMMON)
@given(programs(max_dim=4))
def test_random_programs_triton(program):
    check(program, "triton")


@settings(max_examples=int(25 * SCALE), **COMMON)
@given(programs(max_dim=6), st.integers(1, 3), st.booleans())
def test_random_programs_gathered(program, picks, keep_full):
    """A random chain's result gathered along a random dim (passes/gather_sink.py moves the gather
    up the chain, through broadcast operands), optionally returned whole as well."""
    in_shapes, steps, _, _, seed = program
    g = torch.Generator().manual_seed(seed)
    xs = [torch.rand(s, generator=g) * 6 - 3 for s in in_shapes]
    chain = build(steps, None, False)
    out = chain(*xs)[0]
    if out.dim() == 0:
        return
    dim = seed % out.dim()
    shape = list(out.shape)
    shape[dim] = picks
    idx = torch.randint(0, out.shape[dim], shape, generator=g)

    def fn(*a):
        v = chain(*a[:-1])[0]
        picked = torch.gather(v, dim, a[-1])
        return (v, picked) if keep_full else (picked,)
    args = (*xs, idx)
    gm = make_fx(fn, decomposition_table=decomposition_table())(*args)
    compiled, _ = compile_graph(from_fx(gm), kiln.Options(target="cpu"), verify=True)
    for a, b in zip(compiled(*args), fn(*args)):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

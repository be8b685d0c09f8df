"""A pointwise kernel whose output keeps a permuted input's layout (eager's rule; Llama's q after
its rotary embedding) is walked in that memory order (codegen/lower.memory_order): the Triton
kernel stores at its linear index, the CPU kernel's address strides fall from outer to inner
dims; both match eager, values and strides."""
from __future__ import annotations

import re

import pytest
import torch

import kiln


def rope(q, c, s):      # q [B, S, H, D] in memory, computed as [B, H, S, D]
    q = q.transpose(1, 2)
    return q * c + torch.cat((-q[..., 4:], q[..., :4]), -1) * s


def contiguous_copy(q, c, s):       # the output is laid out logically already: nothing to reorder
    return q.transpose(1, 2).contiguous() * 2


@pytest.mark.parametrize("target", ["cpu", "triton"])
@pytest.mark.parametrize("fn", [rope, contiguous_copy])
def test_walked_in_memory_order(fn, target, tmp_path):
    torch.manual_seed(0)
    q, c, s = torch.randn(2, 6, 3, 8), torch.randn(6, 8), torch.randn(6, 8)
    torch._dynamo.reset()
    got = kiln.compile(fn, target=target, cache_dir=str(tmp_path))(q, c, s)
    ref = fn(q, c, s)
    torch.testing.assert_close(got, ref)
    assert got.stride() == ref.stride()
    (src,) = [p.read_text() for p in tmp_path.rglob("k_*.py")]
    if target == "triton":
        assert "tl.store(out_ptr0 + (x)," in src, src
        assert bool(re.search(r"tl\.load\(in_ptr\d \+ \(x\),", src)) == (fn is rope), src     # q read in order too
    else:
        store = next(line for line in src.splitlines() if "out0[" in line)
        strides = [int(m) for m in re.findall(r"np\.uint64\((\d+)\)", store.split("=")[0])]
        assert strides == sorted(strides, reverse=True), store

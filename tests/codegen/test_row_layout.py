"""2-D pointwise kernels with a row's worth of work are laid out in rows on the Triton target
(codegen/lower.rows_of), the rest stay flat; both match eager (Triton interpreter)."""
from __future__ import annotations

import pytest
import torch

import kiln


def heavy(x, s, t):     # eight statements on the row's values alone
    k = torch.where(t > 0, s.exp() / (s + 2), s * s - 1)
    return x * (k.sqrt() + torch.where(t < 2, k, -k) * 0.5) - s


def light(x, s, t):     # the row's values only loaded
    return x * s + t


@pytest.mark.parametrize("cols", [96, 9001])
@pytest.mark.parametrize("fn,rows", [(heavy, True), (light, False)])
def test_row_layout(fn, rows, cols, tmp_path):
    torch.manual_seed(0)
    x, s, t = torch.randn(5, cols), torch.randn(5, 1), torch.randint(-1, 3, (5, 1))
    s[1], s[3] = float("inf"), float("nan")
    torch._dynamo.reset()
    got = kiln.compile(fn, target="triton", cache_dir=str(tmp_path))(x, s, t)
    torch.testing.assert_close(got, fn(x, s, t), equal_nan=True)
    (src,) = [p.read_text() for p in tmp_path.rglob("k_*.py")]
    assert ("tl.arange(0, RBLOCK)[None, :]" in src) == rows, src

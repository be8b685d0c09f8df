"""CUDA C sources generated for fused groups compile with nvcc (where nvcc exists; the GPU
tests run them against eager)."""
import os
import shutil
import subprocess

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from kiln.codegen.cuda_gen import render
from kiln.codegen.lower import lower
from kiln.ir.capture import from_fx
from kiln.ir.decompose import decomposition_table
from kiln.passes.cleanup import dce
from kiln.passes.fuse import fuse

F = torch.nn.functional


def _groups(fn, *args):
    gm = make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="fake")(*args)
    return [n for n in fuse(dce(from_fx(gm))).nodes if n.op == "kiln.fused"]


def _model(x, w, b, r, i):
    y = F.gelu(x + b) + r
    return (F.layer_norm(torch.softmax(y, -1), (16,), w, b), y.sum(0), torch.log_softmax(y.double(), -1),
            (i // 3) % 5 + (i > 2), y.bfloat16().amax(-1), (i > 0).all(-1), torch.where(x > 0, x.half(), 0.5),
            x.pow(3.5).clamp(-1, 1), torch.isnan(x) | torch.isinf(r))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    args = (torch.randn(4, 16), torch.randn(16), torch.randn(16), torch.randn(4, 16), torch.randint(-9, 9, (4, 16)))
    groups = _groups(_model, *args)
    assert len(groups) >= 3
    for n in groups:
        src, _ = render(lower(n))
        p = tmp_path / f"{n.attrs['name']}.cu"
        p.write_text(src)
        r = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-c", str(p), "-o", os.devnull],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"{p}:\n{r.stderr[:2000]}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_float_remainder_sources_compile_with_nvcc(tmp_path):
    """kiln_fmod_floor (torch.remainder on floats) and kiln_fdiv_floor (floor division) for float
    and double."""
    def model(a, b, c):
        return (torch.remainder(a, b) + torch.fmod(a, 3.0) + a // b + a ** 0.5 + a ** -2 + a.half() ** 3,
                torch.remainder(c, 0.3) + c // 0.1 + c ** -0.5 + c ** -1)
    groups = _groups(model, torch.randn(4, 16), torch.randn(16), torch.randn(4, 16, dtype=torch.float64))
    assert groups
    for n in groups:
        src, _ = render(lower(n))
        assert src.count("kiln_fmod_floor(") > 1 and src.count("kiln_fdiv_floor(") > 1     # defined and called
        p = tmp_path / f"{n.attrs['name']}.cu"
        p.write_text(src)
        r = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-c", str(p), "-o", os.devnull],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"{p}:\n{r.stderr[:2000]}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_integer_to_16_bit_float_sources_compile_with_nvcc(tmp_path):
    """Integers promoted into bf16 / fp16 arithmetic convert through float (ir/scalar.py cast)."""
    def model(i, b, h):
        return i + b, (i < b).to(torch.bfloat16) * b, i * h + 1, i.to(torch.bfloat16) - b
    groups = _groups(model, torch.randint(-300, 300, (4, 16)), torch.randn(4, 16, dtype=torch.bfloat16),
                     torch.randn(16, dtype=torch.float16))
    assert groups
    for n in groups:
        src, _ = render(lower(n))
        assert "__float2bfloat16((float)(" in src or "__float2half((float)(" in src
        p = tmp_path / f"{n.attrs['name']}.cu"
        p.write_text(src)
        r = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-c", str(p), "-o", os.devnull],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"{p}:\n{r.stderr[:2000]}"

"""The decomposition table used at capture: core ATen, plus composite ops (softmax, norms,
activations, their backwards) broken into pointwise ops and simple reductions that fusion can
see through. Where PyTorch's own decomposition would lower to ``prims``, kiln's version below
stays in ATen, with fp32 accumulation for 16-bit inputs."""
from __future__ import annotations

import functools
import math

import torch
from torch._decomp import core_aten_decompositions, get_decompositions

aten = torch.ops.aten

_COMPOSITES = [
    aten._softmax, aten._log_softmax, aten.native_layer_norm, aten.gelu, aten.hardswish,
    aten.logsumexp, aten._softmax_backward_data, aten._log_softmax_backward_data,
    aten.native_layer_norm_backward, aten.gelu_backward, aten.silu_backward, aten.tanh_backward,
    aten.sigmoid_backward, aten.threshold_backward, aten.rsub, aten.addcmul, aten.leaky_relu,
    aten.elu, aten.softplus, aten.hardtanh, aten.clamp_min, aten.clamp_max, aten.mish,
    aten.native_group_norm, aten._native_batch_norm_legit_functional,
    aten._native_batch_norm_legit_no_training, aten.native_batch_norm, aten.mse_loss, aten.glu,
    # no_training decomposes into the (mutable-schema) _native_batch_norm_legit with training=False,
    # which must decompose further or the captured graph is not functional
    aten._native_batch_norm_legit,
    aten.addmm, aten.lerp, aten.frac, aten.masked_fill, aten.logit, aten.hardsigmoid,
    aten.relu6, aten.xlogy, aten.erfc, aten.native_dropout,
    aten.split_with_sizes,              # into slices: views fusion sees through
]


def _low(x: torch.Tensor) -> bool:
    return x.dtype in (torch.float16, torch.bfloat16)


def _dims(x, dim):
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(x.dim()))
    return [d % max(x.dim(), 1) for d in ([dim] if isinstance(dim, int) else dim)]


def var_mean(x, dim=None, *, correction=None, keepdim=False):
    """Two passes, the second corrected for the mean's rounding (Chan, Golub and LeVeque): with
    d = x - mean, sum(d^2) - sum(d)^2 / n. Without the correction a mean rounded by delta adds
    n * delta^2, which swamps the variance of data far from zero (mean 1000, std 0.01: var 1e-4
    off, relative, in fp32; eager 3e-8)."""
    dims = _dims(x, dim)
    xf = x.float() if _low(x) else x
    n = math.prod(x.shape[d] for d in dims) if x.dim() else 1
    corr = 1 if correction is None else correction
    mean = aten.mean.dim(xf, dims, True)
    d = xf - mean
    s1 = aten.sum.dim_IntList(d, dims, keepdim)
    m2 = aten.clamp_min(aten.sum.dim_IntList(d * d, dims, keepdim) - s1 * s1 / max(n, 1), 0)
    var = m2 / max(n - corr, 0)
    if not keepdim:
        mean = aten.squeeze.dims(mean, dims)
    return (var.to(x.dtype), mean.to(x.dtype)) if _low(x) else (var, mean)


def var(x, dim=None, *, correction=None, keepdim=False):
    return var_mean(x, dim, correction=correction, keepdim=keepdim)[0]


def std(x, dim=None, *, correction=None, keepdim=False):
    return torch.sqrt(var(x, dim, correction=correction, keepdim=keepdim))


def _unbiased(fn):
    """The ``.dim`` overloads (``unbiased`` flag): torch.export's decompositions keep them where
    tracing turns them into ``.correction``."""
    def f(x, dim=None, unbiased=True, keepdim=False):
        return fn(x, dim, correction=1 if unbiased else 0, keepdim=keepdim)
    return f


def silu(x):
    return x * torch.sigmoid(x)


def vector_norm(x, ord=2, dim=None, keepdim=False, *, dtype=None):
    """p-norms as a reduction of a pointwise prologue (F.normalize, clip-by-norm ...)."""
    if dtype is not None or not x.is_floating_point() or x.numel() == 0:
        return NotImplemented
    dims = _dims(x, dim)
    xf = x.float() if _low(x) else x
    a = torch.abs(xf)
    if ord == 2:
        r = torch.sqrt(aten.sum.dim_IntList(xf * xf, dims, keepdim))
    elif ord == 1:
        r = aten.sum.dim_IntList(a, dims, keepdim)
    elif ord == math.inf:
        r = aten.amax.default(a, dims, keepdim)
    elif ord == -math.inf:
        r = aten.amin.default(a, dims, keepdim)
    elif ord == 0:
        r = aten.sum.dim_IntList((xf != 0).to(xf.dtype), dims, keepdim)
    else:
        r = torch.pow(aten.sum.dim_IntList(torch.pow(a, ord), dims, keepdim), 1.0 / ord)
    return r.to(x.dtype) if _low(x) else r


def cat(tensors, dim=0):
    """Concatenation of equal-shaped tensors (rotary embeddings' halves, ``cat((f, f), -1)``) is
    pointwise over [..., k, n, ...]: ``where`` over the k inputs, each broadcast along a new dim,
    picked by a constant index, then viewed as the cat; it fuses with its producers and users.
    With empty inputs (legacy (0,) tensors, or zero-sized along ``dim``: a fresh KV cache) and one
    real input it is a copy, which fuses; any other cat stays ATen."""
    tensors = list(tensors)
    if 2 <= len(tensors) <= CAT_WHERE_MAX and all(t.numel() != 0 for t in tensors):
        return _cat_equal(tensors, dim)
    full = [t for t in tensors if t.numel() != 0]
    if len(full) != 1 or len(full) == len(tensors):
        return NotImplemented
    x = full[0]
    d = dim % x.dim() if x.dim() else 0
    for t in tensors:
        legacy = t.dim() == 1 and t.shape[0] == 0
        aligned = t.dim() == x.dim() and all(a == b for i, (a, b) in enumerate(zip(t.shape, x.shape)) if i != d)
        if t is not x and not legacy and not aligned:
            return NotImplemented          # eager raises a shape error: let it
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    if dtype != x.dtype:
        return aten._to_copy.default(x, dtype=dtype, memory_format=torch.contiguous_format)
    return aten.clone.default(x, memory_format=torch.contiguous_format)


CAT_WHERE_MAX = 4      # inputs: each is one more load and select per element of the kernel


def _cat_equal(tensors, dim):
    x = tensors[0]
    if x.dim() == 0 or any(t.shape != x.shape or t.device != x.device for t in tensors):
        return NotImplemented
    d = dim % x.dim()
    k = len(tensors)
    pick = torch.arange(k, device=x.device).view([k] + [1] * (x.dim() - d))
    res = tensors[-1].unsqueeze(d)
    for i in range(k - 2, -1, -1):
        res = torch.where(pick == i, tensors[i].unsqueeze(d), res)
    shape = list(x.shape)
    shape[d] *= k
    return res.contiguous().view(shape)


def addmm(self, mat1, mat2, beta=1, alpha=1):
    """The product in the operands' dtype (PyTorch's version upcasts 16-bit operands, so a bf16
    linear became an fp32 matmul over an fp32 copy of its weight); scaling and bias after it, in
    fp32 for 16-bit types (a matmul epilogue)."""
    if not (self.is_floating_point() and mat1.dtype == mat2.dtype == self.dtype):
        return NotImplemented
    out = aten.mm.default(mat1, mat2)
    y = out.float() if _low(out) else out
    y = y * alpha
    if beta != 0:
        y = y + (self.float() if _low(self) else self) * beta
    return y.to(out.dtype) if _low(out) else y


def outer(a, b):
    """A product over K = 1 ([B, M, 1] @ [B, 1, N], or 2-D) is an outer product: a broadcast
    multiply, which fuses with its neighbours instead of launching a matmul (older transformers'
    rotary tables: inverse frequencies @ positions). One product per element, rounded once, as
    the matmul rounds it."""
    if a.shape[-1] != 1 or b.shape[-2] != 1 or a.dtype != b.dtype:
        return NotImplemented
    return a * b


def _kiln_table():
    t = {}
    t[aten.addmm.default] = addmm
    t[aten.mm.default] = t[aten.bmm.default] = outer
    for op in (aten.var_mean.correction,):
        t[op] = var_mean
    t[aten.var.correction] = var
    t[aten.std.correction] = std
    t[aten.var_mean.dim], t[aten.var.dim], t[aten.std.dim] = _unbiased(var_mean), _unbiased(var), _unbiased(std)
    t[aten.silu.default] = silu
    t[aten.cat.default] = cat
    t[aten.linalg_vector_norm.default] = vector_norm
    return t


@functools.lru_cache(maxsize=1)
def decomposition_table() -> dict:
    table = dict(core_aten_decompositions())
    table.update(get_decompositions(_COMPOSITES))
    # drop PyTorch's prims-based variants of these; kiln's replacements follow
    for op in list(table):
        if op in (aten.var_mean.default, aten.var_mean.dim, aten.var.default, aten.var.dim,
                  aten.std.default, aten.std.dim, aten.silu.default):
            del table[op]
    table.update(_kiln_table())
    return table

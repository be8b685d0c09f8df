"""kiln.matmul kernels against eager PyTorch (the Triton interpreter without a GPU): mm, addmm,
bmm, broadcast batches, transposed weights, epilogues (bias, gelu, silu*up, residual, bf16 cast),
prologues, split-K, GEMV for M = 1..16, the cuBLAS path with a fused epilogue, horizontal fusion.
The interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest), so bf16 cases get
a few ulps of tolerance here; tests/matmul/test_matmul_gpu.py checks them tightly."""
import warnings

import pytest
import torch

import kiln
from kiln.codegen import matmul_launch

F = torch.nn.functional
BF = torch.bfloat16


def run(fn, *args, cfg=None, monkeypatch=None, rtol=1e-4, atol=1e-5, expect=1):
    if cfg is not None:
        base = matmul_launch.default_config
        monkeypatch.setattr(matmul_launch, "default_config",
                            lambda meta, interp, sms=132, tma=False: {**base(meta, interp, sms, tma), **cfg})
    torch._dynamo.reset()
    with torch.no_grad():
        got = kiln.compile(fn, target="triton")(*args)
        ref = fn(*args)
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape
        torch.testing.assert_close(g.float(), r.float(), rtol=rtol, atol=atol)
    mm = [k for k in kiln.last_report().kernels if k["kind"] == "matmul" and k["target"] == "triton"]
    assert len(mm) == expect, kiln.last_report().kernels
    return mm


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    return {"x": torch.randn(40, 48), "w": torch.randn(24, 48), "b": torch.randn(24), "r": torch.randn(40, 24)}


EPILOGUES = {
    "bias": lambda x, w, b, r: F.linear(x, w, b),
    "bias_gelu": lambda x, w, b, r: F.gelu(F.linear(x, w, b)),
    "residual": lambda x, w, b, r: x @ w.t() + r,
    "scale_tanh_residual": lambda x, w, b, r: torch.tanh(F.linear(x, w, b) * 0.5) + r,
    "mm_untransposed": lambda x, w, b, r: torch.relu(x @ w.t().contiguous()) ,
    "output_and_epilogue": lambda x, w, b, r: (x @ w.t(), torch.sigmoid(x @ w.t()) * 2),
}


@pytest.mark.parametrize("name", list(EPILOGUES))
def test_epilogues(name, data):
    mm = run(EPILOGUES[name], data["x"], data["w"], data["b"], data["r"])
    assert any(op not in ("aten.mm.default", "aten.view.default") for op in mm[0]["ops"])


MODES = {"tile": {"GEMV": 0}, "splitk": {"GEMV": 0, "SPLIT_K": 3, "BLOCK_K": 16},
         "cublas_epilogue": {"ATEN": 1}, "odd_k_blocks": {"GEMV": 0, "BLOCK_K": 32, "BLOCK_M": 32, "BLOCK_N": 16}}


@pytest.mark.parametrize("mode", list(MODES))
def test_launch_modes(mode, data, monkeypatch):
    run(lambda x, w, b, r: F.gelu(F.linear(x, w, b)) + r, data["x"], data["w"], data["b"], data["r"],
        cfg=MODES[mode], monkeypatch=monkeypatch)


CUBLAS_EPILOGUES = {       # case -> whether cuBLAS writes the product into the output, the epilogue in place
    "bias_gelu_residual": (lambda x, w, b, r: F.gelu(F.linear(x, w, b)) + r, True),
    "swiglu": (lambda x, w, b, r: F.silu(x @ w.t()) * (x @ (w * 0.5).t()), True),
    # the epilogue keeps the products' order; the permuted copy after it is a kernel of its own
    "heads_permuted": (lambda x, w, b, r: torch.tanh(F.linear(x, w, b)).view(40, 4, 6).transpose(0, 1).contiguous(),
                       True),
    "output_and_epilogue": (lambda x, w, b, r: (x @ w.t(), torch.sigmoid(x @ w.t()) * 2), False),
    "cast": (lambda x, w, b, r: (F.linear(x, w, b) * 2).to(BF), False),
}


@pytest.mark.parametrize("name", list(CUBLAS_EPILOGUES))
def test_cublas_epilogue_in_place_only_where_layouts_match(name, data, monkeypatch):
    """The cuBLAS path saves the product's temporary by running the epilogue over the output in
    place, but only where the output is the product's elements in order, in its dtype, and the
    segment stores nothing else."""
    fn, inplace = CUBLAS_EPILOGUES[name]
    calls = []

    class Torch:            # the launcher's torch, with mm recording whether it wrote into an output
        def __getattr__(self, attr):
            return getattr(torch, attr)

        @staticmethod
        def mm(*a, out=None):
            calls.append(out is not None)
            return torch.mm(*a, out=out) if out is not None else torch.mm(*a)
    monkeypatch.setattr(matmul_launch, "torch", Torch())
    run(fn, data["x"], data["w"], data["b"], data["r"], cfg={"ATEN": 1}, monkeypatch=monkeypatch,
        rtol=4e-2 if name == "cast" else 1e-4, atol=4e-2 if name == "cast" else 1e-5)
    assert calls and any(calls) is inplace


W2, W3, B2 = torch.randn(24, 48), torch.randn(24, 48), torch.randn(24)
BIAS_ONLY = {       # case -> (fn, dtype, whether cuBLAS adds the bias itself: addmm, no epilogue pass)
    "linear": (lambda x, w, b, r: F.linear(x, w, b), torch.float32, True),
    "linear_bf16": (lambda x, w, b, r: F.linear(x, w, b), BF, True),
    "qkv": (lambda x, w, b, r: (F.linear(x, w, b), F.linear(x, W2, b), F.linear(x, W3, B2)), torch.float32, True),
    "bias_relu": (lambda x, w, b, r: torch.relu(F.linear(x, w, b)), torch.float32, False),
    "bias_twice": (lambda x, w, b, r: F.linear(x, w, b) + b, torch.float32, False),
    "bias_scaled": (lambda x, w, b, r: torch.addmm(b, x, w.t(), beta=0.5), torch.float32, False),
    "qkv_one_gelu": (lambda x, w, b, r: (F.linear(x, w, b), F.gelu(F.linear(x, W2, b))), torch.float32, False),
}


@pytest.mark.parametrize("name", list(BIAS_ONLY))
def test_cublas_adds_a_bias_itself(name, data, monkeypatch):
    """On the cuBLAS path an epilogue that is only ``product + bias`` runs as addmm (cuBLAS's bias
    epilogue), with no epilogue pass; any other epilogue, in any segment of a horizontally fused
    matmul, keeps the pass (it runs over every segment's product)."""
    fn, dtype, addmm = BIAS_ONLY[name]
    calls = []

    class Torch:
        def __getattr__(self, attr):
            return getattr(torch, attr)

        @staticmethod
        def addmm(*a, **kw):
            calls.append("addmm")
            return torch.addmm(*a, **kw)
    monkeypatch.setattr(matmul_launch, "torch", Torch())
    args = [data[k].to(dtype) for k in ("x", "w", "b", "r")]
    tol = 2e-2 if dtype == BF else 1e-4
    run(fn, *args, cfg={"ATEN": 1}, monkeypatch=monkeypatch, rtol=tol, atol=tol)
    assert bool(calls) is addmm, calls


GEMV_CFGS = {"gemv": {"GEMV": 1, "SPLIT_K": 2, "BLOCK_K": 16},
             "gemv_defer_prefetch": {"GEMV": 1, "BLOCK_K": 16, "DEFER": 1, "PREFETCH": 1},
             "gemv_prefetch_oddk": {"GEMV": 1, "BLOCK_K": 32, "PREFETCH": 1},
             "tile": {"GEMV": 0, "BLOCK_M": 16}}


@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("kernel", list(GEMV_CFGS))
def test_gemv_sizes(M, kernel, data, monkeypatch):
    x = torch.randn(M, 48)
    cfg = GEMV_CFGS[kernel]
    run(lambda x, w: F.linear(x, w) * 3, x, data["w"], cfg=cfg, monkeypatch=monkeypatch)


def test_plain_gemv_is_a_kernel_plain_mm_stays_cublas(data):
    run(lambda x, w: F.linear(x, w), torch.randn(2, 48), data["w"])
    run(lambda x, w: F.linear(x, w), data["x"], data["w"], expect=0)


def test_bmm_and_broadcast_batches():
    torch.manual_seed(1)
    a, b = torch.randn(3, 20, 40), torch.randn(3, 40, 24)
    run(lambda a, b: torch.relu(torch.bmm(a, b)), a, b)
    run(lambda a, b: torch.relu(torch.matmul(a, b[0])), a, b)                    # batch folded into M
    run(lambda a, b: torch.relu(torch.matmul(a, b[:1].expand(3, 40, 24))), a, b)  # stride-0 batch
    run(lambda a, b: torch.relu(torch.bmm(a, b.transpose(1, 2).contiguous().transpose(1, 2))), a, b)


def test_bf16_epilogue_and_cast(data):
    x, w, b = data["x"].to(BF), data["w"].to(BF), data["b"].to(BF)
    run(lambda x, w, b: F.silu(F.linear(x, w, b)), x, w, b, rtol=4e-2, atol=4e-2)
    run(lambda x, w: (x.float() @ w.float().t()).to(BF) * 2, x, w, rtol=4e-2, atol=4e-2)


def test_prologues(data):
    x, w = data["x"], data["w"]
    mm = run(lambda x, w: torch.relu((x * 0.5 + 1) @ w.t()), x, w)
    assert "aten.add.Tensor" in mm[0]["ops"]
    xb, wb = x.to(BF).float(), w.to(BF).float()          # exact in bf16: only the output rounds
    run(lambda x, w: (x.to(BF) @ w.to(BF).t()).float(), xb, wb, rtol=2e-2, atol=2e-2)
    a = torch.randn(2, 4, 5, 12)        # A read through a permute: no contiguous copy of it is made
    mm = run(lambda a, w: F.gelu(a.transpose(1, 2).reshape(10, 48) @ w.t()), a, w)
    assert "aten.clone.default" in mm[0]["ops"]


def test_horizontal_qkv_and_swiglu(data):
    torch.manual_seed(2)
    x = data["x"]
    wq, wk, wv = torch.randn(32, 48), torch.randn(16, 48), torch.randn(16, 48)
    mm = run(lambda x, q, k, v: (F.linear(x, q), F.linear(x, k) * 2, F.gelu(F.linear(x, v))), x, wq, wk, wv)
    assert mm[0]["ops"].count("aten.mm.default") == 1 and "mm_mm_mm" in mm[0]["name"]
    g, u = torch.randn(32, 48), torch.randn(32, 48)
    mm = run(lambda x, g, u: F.silu(F.linear(x, g)) * F.linear(x, u), x, g, u)
    assert "mm_mm" in mm[0]["name"]
    run(lambda x, g, u: F.silu(F.linear(x, g)) * F.linear(x, u), x[:3], g, u)       # decode: GEMV pair


def test_default_config_sends_ieee_fp32_products_to_cublas(monkeypatch):
    """Without TF32 an fp32 template product is FMA loops: cuBLAS by default, unless the A
    operand exists only inside the kernel (a prologue) or the shape is a decode GEMV."""
    from kiln.codegen import matmul_config
    from kiln.codegen.matmul_config import default_config
    monkeypatch.setattr(matmul_config, "_tf32", lambda: False)     # (torch's flag does not monkeypatch back)
    meta = {"M": 512, "K": 256, "batch": 1, "segments": [{"n": 768, "P": 1}], "gemv": False,
            "prologue": False, "dtype": "float32"}
    assert default_config(meta, interpret=False)["ATEN"] == 1
    assert default_config({**meta, "prologue": True}, interpret=False)["ATEN"] == 0
    assert default_config({**meta, "dtype": "bfloat16"}, interpret=False)["ATEN"] == 0
    assert default_config({**meta, "M": 4, "gemv": True}, interpret=False)["GEMV"] == 1
    monkeypatch.setattr(matmul_config, "_tf32", lambda: True)
    assert default_config(meta, interpret=False)["ATEN"] == 0


TMA = {"TMA": 1, "GEMV": 0, "SPLIT_K": 1, "BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_stages": 2}
TMA_CASES = {       # fp32 and fp16 (the interpreter reads bf16 through a descriptor as garbage)
    "bias_gelu": (lambda x, w, b, r: F.gelu(F.linear(x, w, b)), torch.float32),
    "residual_n_major_b": (lambda x, w, b, r: x @ w.t().contiguous() + r, torch.float32),
    "swiglu_pair": (lambda x, w, b, r: F.silu(x @ w.t()) * (x @ (w * 0.5).t()), torch.float32),
    "fp16_scale_tanh": (lambda x, w, b, r: torch.tanh(F.linear(x, w, b) * 0.5) + r, torch.float16),
}


@pytest.mark.parametrize("name", list(TMA_CASES))
def test_tma_kernel(name, data, monkeypatch, descriptors):
    """The persistent TMA variant (tiles walked by fewer programs than tiles, edge tiles read as
    zeros) against eager, with B K-major (a weight) or N-major (a contiguous transpose)."""
    fn, dt = TMA_CASES[name]
    args = [data[k].to(dt) for k in ("x", "w", "b", "r")]
    tol = 2e-3 if dt == torch.float16 else 1e-4
    monkeypatch.setattr(matmul_launch, "torch", _SmallGrid(monkeypatch))
    run(fn, *args, cfg=TMA, monkeypatch=monkeypatch, rtol=tol, atol=tol)
    # A and B (a single product each: w * 0.5 folds into the epilogue); the output keeps its
    # masked stores (descriptor stores are for weight pairs: test_tma_kernel_reads_a_weight_pair_as_one_view)
    assert len(descriptors) == 2


def test_tma_kernel_keeps_masked_stores_for_unaligned_rows(data, monkeypatch, descriptors):
    """A weight pair's output whose rows a TMA store cannot take (22 fp32: 88 bytes, not a
    multiple of 16) keeps the masked stores; A and the pair still come through descriptors."""
    monkeypatch.setattr(matmul_launch, "torch", _SmallGrid(monkeypatch))
    g, u = torch.randn(22, 48), torch.randn(22, 48)
    run(lambda x, g, u: F.silu(F.linear(x, g)) * F.linear(x, u), data["x"], g, u, cfg=TMA, monkeypatch=monkeypatch)
    assert sorted(len(d.shape) for d in descriptors) == [2, 3]


def test_tma_kernel_that_does_not_fit_runs_the_tile_kernel(data, monkeypatch):
    """A TMA config the device cannot hold (Triton's OutOfResources at launch) warns once and
    runs the same tile without TMA from then on, matching eager; it does not crash the call."""
    from triton.runtime.errors import OutOfResources
    from triton.tools import tensor_descriptor
    tried = []

    class TooBig(tensor_descriptor.TensorDescriptor):
        def __post_init__(self):
            tried.append(1)
            raise OutOfResources(245784, 232448, "shared memory")
    monkeypatch.setattr(tensor_descriptor, "TensorDescriptor", TooBig)
    base = matmul_launch.default_config
    monkeypatch.setattr(matmul_launch, "default_config",
                        lambda meta, interp, sms=132, tma=False: {**base(meta, interp, sms, tma), **TMA})
    fn = lambda x, w, r: x @ w.t() + r       # noqa: E731
    torch._dynamo.reset()
    compiled = kiln.compile(fn, target="triton")
    with torch.no_grad():
        for x in (data["x"], data["x"] * 2):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                got = compiled(x, data["w"], data["r"])
            torch.testing.assert_close(got, fn(x, data["w"], data["r"]), rtol=1e-4, atol=1e-5)
            assert sum("does not fit" in str(w.message) for w in seen) == (x is data["x"])
    assert len(tried) == 1      # the second call did not try TMA again


def _SmallGrid(monkeypatch):
    """``torch`` as the launcher sees it, but 3 SMs: each persistent program walks several tiles."""
    import types
    cuda = types.SimpleNamespace(is_available=lambda: False,
                                 get_device_properties=lambda i: types.SimpleNamespace(multi_processor_count=3))
    names = {k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")}
    return types.SimpleNamespace(**names | {"cuda": cuda})


@pytest.mark.parametrize("order", ["up_above", "up_below"])
def test_tma_kernel_reads_a_weight_pair_as_one_view(order, data, monkeypatch, descriptors):
    """Gate and up weights, 64 bytes apart in one buffer either way round (the 3-D view's halves
    swap), are read through one [2, N, K] descriptor and match eager."""
    x = data["x"]
    buf = torch.randn(2 * 24 * 48 + 16)
    lo, hi = buf[:24 * 48].view(24, 48), buf[24 * 48 + 16:].view(24, 48)
    g, u = (hi, lo) if order == "up_below" else (lo, hi)
    # outputs reach ~1e2 (fp32 sums of 48 products of unit normals, multiplied): an element where
    # silu(gate) cancels to ~1e-2 differed by 1.4e-5 from eager in one test order (numpy's summation
    # order in the interpreter), so the absolute tolerance is 1e-5 of the outputs' scale
    run(lambda x, g, u: F.silu(F.linear(x, g)) * F.linear(x, u), x, g, u, cfg=TMA, monkeypatch=monkeypatch,
        atol=1e-3)
    assert sorted(len(d.shape) for d in descriptors) == [2, 2, 3]     # A, the output, both weights


@pytest.mark.parametrize("mode", ["tile", "cublas", "tma"])
def test_plain_weight_pair_stores_both_products(mode, data, monkeypatch, descriptors):
    """GQA's k and v at cuBLAS's sizes (thresholds lowered here): one launch over both weights
    whose products are both outputs, against eager in the tile kernel, through cuBLAS (each
    product written straight out) and in the TMA kernel (the pair view in, two descriptors out)."""
    from kiln.passes import matmul as mm_pass
    monkeypatch.setattr(mm_pass, "CUBLAS_MIN_M", 40)
    monkeypatch.setattr(mm_pass, "CUBLAS_MIN_FLOPS", 1)
    x, wk, wv = data["x"], torch.randn(16, 48), torch.randn(16, 48)
    cfg = {"tile": {"GEMV": 0}, "cublas": {"ATEN": 1}, "tma": TMA}[mode]
    if mode == "tma":
        monkeypatch.setattr(matmul_launch, "torch", _SmallGrid(monkeypatch))
    run(lambda x, k, v: (F.linear(x, k), F.linear(x, v)), x, wk, wv, cfg=cfg, monkeypatch=monkeypatch,
        atol=1e-4)
    if mode == "tma":
        assert sorted(len(d.shape) for d in descriptors) == [2, 2, 2, 3]   # A, k, v, both weights


def test_default_config_runs_a_small_plain_pair_with_tma():
    """Two plain products (the pass's split) too small to fill the GPU alone run as one TMA launch
    (PAIR_NOTE); larger ones, or without TMA, stay cuBLAS's two products."""
    from kiln.codegen.matmul_config import default_config
    meta = {"M": 8192, "K": 2048, "batch": 1, "segments": [{"n": 256, "P": 2}], "gemv": False,
            "prologue": False, "dtype": "bfloat16", "identity": True, "tma": {"pair": True, "stores": [0, 1]}}
    cfg = default_config(meta, interpret=False, tma=True)
    assert (cfg["TMA"], cfg["BLOCK_N"], cfg["FLATTEN"], cfg["num_stages"]) == (1, 128, 1, 3)
    assert default_config({**meta, "K": 4096, "segments": [{"n": 1024, "P": 2}]}, interpret=False, tma=True)["ATEN"] == 1
    assert default_config(meta, interpret=False, tma=False)["ATEN"] == 1
    assert default_config({**meta, "tma": {"pair": False}}, interpret=False, tma=True)["ATEN"] == 1


def test_tma_kernel_falls_back_on_an_unaligned_input(data, monkeypatch, descriptors):
    """TMA needs 16-byte-aligned addresses: an input one element off runs the same tile without it."""
    fn = lambda x, w, r: x @ w.t() + r       # noqa: E731
    run(fn, data["x"], data["w"], data["r"], cfg=TMA, monkeypatch=monkeypatch)
    assert descriptors
    descriptors.clear()
    x = torch.empty(40 * 48 + 1)[1:].view(40, 48).copy_(data["x"])
    run(fn, x, data["w"], data["r"], cfg=TMA, monkeypatch=monkeypatch)
    assert not descriptors


def test_default_config_fuses_a_large_epilogue_with_tma():
    """Large 16-bit products: an epilogue cuBLAS cannot run goes to the TMA kernel where the device
    has TMA; a plain product or one plus a bias stays on cuBLAS."""
    from kiln.codegen.matmul_config import default_config
    meta = {"M": 8192, "K": 2048, "batch": 1, "segments": [{"n": 5632, "P": 2}], "gemv": False,
            "prologue": False, "dtype": "bfloat16", "identity": False}
    cfg = default_config(meta, interpret=False, tma=True)
    assert cfg["TMA"] == 1 and cfg["FLATTEN"] == 0 and cfg["num_stages"] == 4     # two descriptors
    # the pair view (two K-major weights alike): its measured best, the tile loop flattened
    # where K is short or the outputs leave through TMA descriptors
    pair = {**meta, "tma": {"pair": True}}
    stored = {**meta, "K": 4096, "tma": {"pair": True, "stores": [0]}}
    assert [(c["FLATTEN"], c["num_stages"], c["GROUP_M"]) for c in (default_config(m, interpret=False, tma=True)
            for m in (pair, {**pair, "K": 4096}, stored))] == [(1, 3, 16), (0, 3, 16), (1, 3, 16)]
    assert default_config(meta, interpret=False, tma=False)["ATEN"] == 1
    assert default_config({**meta, "identity": True}, interpret=False, tma=True)["ATEN"] == 1
    assert default_config({**meta, "dtype": "float32"}, interpret=False, tma=True).get("TMA", 0) == 0


def test_tma_kernel_in_a_training_step(data, monkeypatch, descriptors):
    """A training step with every kiln.matmul on the TMA kernel: forward and backward against
    eager (inputs', weights' and biases' gradients)."""
    monkeypatch.setattr(matmul_launch, "torch", _SmallGrid(monkeypatch))
    base = matmul_launch.default_config
    monkeypatch.setattr(matmul_launch, "default_config",
                        lambda meta, interp, sms=132, tma=False: {**base(meta, interp, sms, tma), **TMA})
    torch.manual_seed(3)
    lin1, lin2 = torch.nn.Linear(48, 32), torch.nn.Linear(32, 48)
    ref1, ref2 = (torch.nn.Linear(48, 32), torch.nn.Linear(32, 48))
    ref1.load_state_dict(lin1.state_dict())
    ref2.load_state_dict(lin2.state_dict())
    fn = lambda m1, m2, x: (m2(F.gelu(m1(x))) + x).square().sum()      # noqa: E731
    x = data["x"].clone().requires_grad_(True)
    xr = data["x"].clone().requires_grad_(True)
    torch._dynamo.reset()
    kiln.compile(lambda x: fn(lin1, lin2, x), target="triton")(x).backward()
    fn(ref1, ref2, xr).backward()
    for a, b in [(x.grad, xr.grad), (lin1.weight.grad, ref1.weight.grad), (lin2.weight.grad, ref2.weight.grad),
                 (lin1.bias.grad, ref1.bias.grad)]:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the forward's product with its bias and GELU, the backward's input gradient with GELU's
    # derivative (B N-major there); the plain products stay ATen calls
    assert [list(d.shape) for d in descriptors] == [[40, 48], [32, 48], [40, 32], [32, 48]]


def _residual_dies(y, w):
    """A pre-norm block's tail: h = 2y, then down(rms(h)) + h. h (the norm kernel's second output)
    dies at the product's epilogue, which cannot join the norm's kernel (it reads the product)."""
    h = y * 2
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return n @ w.t() + h


def _residual_dies_inside(y, w):
    """... and the product's output an intermediate (the arena holds both) read by an ATen op."""
    return torch.cumsum(_residual_dies(y, w), -1)


@pytest.mark.parametrize("mode", ["arena", "dynamic", "dynamic-3d"])
@pytest.mark.parametrize("cfg", ["tile", "cublas"])
def test_epilogue_output_over_a_dying_residual(mode, cfg, data, monkeypatch):
    """The product's output is written over a residual that dies at it (passes/inplace.py: the
    arena plan's aliases for an intermediate; dynamic mode, where the graph's own output may
    take the residual's tensor). The tile kernel loads each element of it before storing there;
    the cuBLAS path adds it as C in C += A @ B, in place (addmm over the output, no epilogue pass
    and no copy). Checked against eager and by the plan's validator. "dynamic-3d": a [B, S, K]
    input, whose product capture writes as view, mm, view (a Llama layer's down projection)."""
    import kiln.passes.memory as memory
    from kiln.aot import compile_ahead
    from kiln.passes.validate import validate_plan
    mode, d3 = mode.removesuffix("-3d"), mode.endswith("-3d")
    if mode == "dynamic":
        monkeypatch.setattr(memory, "DYNAMIC_DEVICES", ("cuda", "cpu"))
        monkeypatch.setattr(memory, "DYNAMIC_MARGIN", (-(1 << 30), -1.0))
    fn = _residual_dies if mode == "dynamic" else _residual_dies_inside
    calls = []

    class Torch:
        def __getattr__(self, attr):
            return getattr(torch, attr)

        @staticmethod
        def addmm(c, a, b, out=None):
            calls.append(out is c)
            return torch.addmm(c, a, b, out=out)
    monkeypatch.setattr(matmul_launch, "torch", Torch())
    y, w = torch.randn(*((2, 20) if d3 else (40,)), 24), torch.randn(24, 24) / 5
    base = matmul_launch.default_config
    extra = {"GEMV": 0} if cfg == "tile" else {"ATEN": 1}
    monkeypatch.setattr(matmul_launch, "default_config",
                        lambda meta, interp, sms=132, tma=False: {**base(meta, interp, sms, tma), **extra})
    compiled, _ = compile_ahead(fn, (y, w), {"target": "triton"})
    g = compiled.graph
    plan = g.meta["memory_plan"]
    [mm] = [n for n in g.nodes if n.op == "kiln.matmul"]
    [norm] = [n for n in g.nodes if n.op == "kiln.fused" and n.attrs["kind"] == "reduction"]
    assert plan.mode == mode and plan.overwrites.get(mm.outputs[0].name) in {v.name for v in norm.outputs}, \
        plan.overwrites
    assert validate_plan(g, plan) == []
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled(y, w)[0], fn(y, w), rtol=1e-4, atol=1e-4)
    # the first call writes aside (runtime/executor.py _launch_aside: a first launch may tune and
    # re-run): the output is not on the residual then, and the product takes mm and the pass
    assert calls == ([True] if cfg == "cublas" else []), calls

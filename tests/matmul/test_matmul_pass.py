"""passes/matmul.py: what becomes a kiln.matmul node and what it absorbs, checked on compiled
graphs (outputs are always compared with eager too)."""
import json

import torch

import kiln
from kiln.aot import compile_ahead

F = torch.nn.functional


def compile_graph(fn, *args, target="triton", tol=(1e-4, 1e-5), **opts):
    compiled, _ = compile_ahead(fn, args, {"target": target, **opts})
    with torch.no_grad():
        got, ref = compiled(*args), fn(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=tol[0], atol=tol[1])
    return compiled.graph


def matmuls(g):
    return [n for n in g.nodes if n.op == "kiln.matmul"]


def ops_of(g):
    return [n.op for n in g.nodes]


X, W, B = torch.randn(40, 48), torch.randn(24, 48), torch.randn(24)


def test_cpu_keeps_aten_matmuls():
    g = compile_graph(lambda x, w, b: F.gelu(F.linear(x, w, b)), X, W, B, target="cpu")
    assert not matmuls(g) and "aten.addmm.default" in ops_of(g)      # the bias back in BLAS (passes/addmm.py)


def test_plain_matmul_stays_cublas_unless_tuning():
    g = compile_graph(lambda x, w: x @ w.t(), X, W)
    assert not matmuls(g)
    torch._dynamo.reset()
    g = compile_graph(lambda x, w: x @ w.t(), X, W, autotune=True)    # the tuner decides per shape
    assert len(matmuls(g)) == 1


def test_epilogue_absorbed_and_escaping_product_stored():
    g = compile_graph(lambda x, w, b: (F.linear(x, w, b), torch.sigmoid(F.linear(x, w, b)) * 3), X, W, B)
    [n] = matmuls(g)
    assert len(n.outputs) == 2 and not [m for m in g.nodes if m.op == "kiln.fused"]
    seg = n.attrs["plan"]["segments"][0]
    assert len(seg["groups"]) >= 1 and seg["stores"] == [v.name for v in n.outputs]


def test_reduction_consumer_not_absorbed():
    g = compile_graph(lambda x, w: torch.softmax(x @ w.t(), -1), X, W)
    assert not matmuls(g) and "aten.mm.default" in ops_of(g)


def test_epilogue_reading_a_value_computed_from_the_product_is_not_absorbed():
    def fn(x, w):
        y = x @ w.t()
        t = (y.t() @ y).sum()
        return torch.relu(y) * t
    # t is a sum of ~1e4-sized terms: its float32 rounding follows the thread count (an xdist run
    # once differed from eager by 1.25e-4 relative), and it scales y's rounding too: outputs reach
    # ~1e5, and an element where y's dot product cancels to ~1e-3 once differed by 3.6e-3 (4e-8 of
    # the largest output). The absolute tolerance is 1e-6 of the outputs' scale.
    g = compile_graph(fn, X[:8], W, tol=(1e-3, 1e-1))
    first = matmuls(g)[0]
    assert first.attrs["plan"]["segments"][0]["groups"] == []


def test_horizontal_segments_and_pairs():
    wq, wk, wv = torch.randn(32, 48), torch.randn(16, 48), torch.randn(16, 48)
    g = compile_graph(lambda x, q, k, v: (F.linear(x, q), F.linear(x, k), F.linear(x, v)), X, wq, wk, wv)
    [n] = matmuls(g)
    assert [len(s["acc"]) for s in n.attrs["plan"]["segments"]] == [1, 1, 1]
    torch._dynamo.reset()
    g = compile_graph(lambda x, a, b: F.silu(F.linear(x, a)) * F.linear(x, b), X, wq, wq * 2)
    [n] = matmuls(g)
    [seg] = n.attrs["plan"]["segments"]
    assert len(seg["acc"]) == 2 and len(n.outputs) == 1 and n.outputs[0].type.shape == (40, 32)


def test_plain_products_at_cublas_sizes_split_and_pair(monkeypatch):
    """At cuBLAS's sizes (thresholds lowered here), plain products sharing A are split: q stays an
    ATen call and GQA's k and v, one weight shape, share one launch with an accumulator each;
    three of one shape pair the first two. Below those sizes all stay one launch."""
    from kiln.passes import matmul as mm_pass
    wq, wk, wv = torch.randn(32, 48), torch.randn(16, 48), torch.randn(16, 48)
    qkv = lambda x, q, k, v: (F.linear(x, q), F.linear(x, k), F.linear(x, v))  # noqa: E731
    g = compile_graph(qkv, X, wq, wk, wv)
    assert [len(s["acc"]) for s in matmuls(g)[0].attrs["plan"]["segments"]] == [1, 1, 1]
    monkeypatch.setattr(mm_pass, "CUBLAS_MIN_M", 40)
    monkeypatch.setattr(mm_pass, "CUBLAS_MIN_FLOPS", 2 * 40 * 48 * 48)
    torch._dynamo.reset()
    g = compile_graph(qkv, X, wq, wk, wv)
    [n] = matmuls(g)
    [seg] = n.attrs["plan"]["segments"]
    assert len(seg["acc"]) == 2 and seg["stores"] == seg["acc"] and not seg["groups"] and len(n.outputs) == 2
    assert ops_of(g).count("aten.mm.default") == 1                  # q
    torch._dynamo.reset()
    g = compile_graph(qkv, X, wk, wv, torch.randn(16, 48))
    assert [len(s["acc"]) for n in matmuls(g) for s in n.attrs["plan"]["segments"]] == [2]
    assert ops_of(g).count("aten.mm.default") == 1
    torch._dynamo.reset()                                           # an epilogue: one launch as before
    g = compile_graph(lambda x, q, k, v: (F.linear(x, q), torch.relu(F.linear(x, k)), F.linear(x, v)), X, wq, wk, wv)
    assert [len(s["acc"]) for s in matmuls(g)[0].attrs["plan"]["segments"]] == [1, 1, 1]


def test_computed_b_is_not_stacked():
    def fn(x, w):
        w2 = w * 2                                  # computed at run time: not a weight
        return F.gelu(F.linear(x, w)), torch.relu(F.linear(x, w2))
    g = compile_graph(fn, X, W)
    assert len(matmuls(g)) == 2


def test_prologue_cast_absorbed():
    xb = X.to(torch.bfloat16).float()       # exact in bf16 (the interpreter's casts truncate)
    g = compile_graph(lambda x, w: torch.relu((x * 2).to(torch.bfloat16) @ w.t()), xb, W.to(torch.bfloat16),
                      tol=(2e-2, 2e-2))
    [n] = matmuls(g)
    assert n.attrs["plan"]["prologue"] is not None and n.attrs["plan"]["a"] is None
    assert not [m for m in g.nodes if m.op == "kiln.fused"]


def test_plan_is_json_and_artifact_roundtrips(tmp_path):
    from kiln.runtime import load, save
    fn = lambda x, w, b: F.gelu(F.linear(x, w, b))  # noqa: E731
    compiled, _ = compile_ahead(fn, (X, W, B), {"target": "triton"})
    [n] = matmuls(compiled.graph)
    json.dumps(n.attrs["plan"])
    save(compiled, str(tmp_path / "a"))
    loaded = load(str(tmp_path / "a"))
    torch.testing.assert_close(loaded(X, W, B)[0], fn(X, W, B), rtol=1e-4, atol=1e-5)
    assert kiln.last_report() is not None


def test_swiglu_pairs_when_fusion_splits_the_epilogue(monkeypatch):
    """At LLM sizes fuse keeps silu(gate) and (.. * up) apart (merging would hold the gate product
    in memory); the two matmuls still share a segment, and both groups become its epilogue."""
    from kiln.passes import fuse as fuse_mod
    monkeypatch.setattr(fuse_mod, "HOLD_BYTES", 0)
    g_w, u_w, d_w = torch.randn(32, 48), torch.randn(32, 48), torch.randn(48, 32)
    g = compile_graph(lambda x, a, b, c: F.linear(F.silu(F.linear(x, a)) * F.linear(x, b), c), X, g_w, u_w, d_w,
                      tol=(1e-4, 1e-3))           # fp32 sums of O(100) terms: rounding order
    [n] = matmuls(g)
    [seg] = n.attrs["plan"]["segments"]
    assert len(seg["acc"]) == 2 and len(seg["groups"]) == 2 and len(n.outputs) == 1
    assert "aten.mm.default" in ops_of(g)             # the down projection stays with cuBLAS


def test_cpu_recomposes_addmm_only_where_it_is_exact():
    """cpu: mm * alpha + bias * beta -> addmm (the bias a row vector or a full matrix); a product
    read twice, a bias of another shape, and integer products stay as they were."""
    x, w, b, full = torch.randn(40, 48), torch.randn(48, 24), torch.randn(24), torch.randn(40, 24)
    g = compile_graph(lambda x, w, b: (x @ w) * 0.5 + b * 2.0, x, w, b, target="cpu")
    assert [n.attrs for n in g.nodes if n.op == "aten.addmm.default"] == [{}]
    assert [n.kwargs for n in g.nodes if n.op == "aten.addmm.default"] == [{"beta": 2.0, "alpha": 0.5}]
    g = compile_graph(lambda x, w, c: x @ w + c, x, w, full, target="cpu")
    assert "aten.addmm.default" in ops_of(g)
    g = compile_graph(lambda x, w, b: (x @ w + b, (x @ w).sum()), x, w, b, target="cpu")
    assert "aten.addmm.default" not in ops_of(g)
    g = compile_graph(lambda x, w, c: x @ w + c, x, w, torch.randn(40, 1), target="cpu")
    assert "aten.addmm.default" not in ops_of(g)
    xi, wi = torch.randint(-3, 3, (8, 6)), torch.randint(-3, 3, (6, 5))
    g = compile_graph(lambda x, w, b: x @ w + b, xi, wi, torch.randint(-3, 3, (5,)), target="cpu")
    assert "aten.addmm.default" not in ops_of(g)

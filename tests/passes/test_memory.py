"""Liveness, in-place reuse, out= matmuls in the arena, and the plan's serialised form. Every
compiled function is checked against eager; every plan against the independent validator."""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln.ir import Graph, Node, TensorType, Value
from kiln.passes.memory import ALIGN, MemoryPlan, liveness, plan_memory
from kiln.passes.pipeline import run_pipeline
from kiln.passes.validate import validate_plan


def tt(shape, dtype=torch.float32):
    return TensorType.of(torch.empty(shape, dtype=dtype))


def _mm_chain() -> Graph:
    """x@w -> view -> relu(view) ... : a matmul output, a view extending its life, an output."""
    x, w = Value("x", tt([4, 8])), Value("w", tt([8, 8]))
    a, av, b, c = Value("a", tt([4, 8])), Value("av", tt([32])), Value("b", tt([32])), Value("c", tt([4, 8]))
    return Graph(inputs=[x, w], nodes=[
        Node("aten.mm.default", (x, w), {}, [a]),
        Node("aten.view.default", (a, [32]), {}, [av]),
        Node("aten.relu.default", (av,), {}, [b]),
        Node("aten.mm.default", (a, w), {}, [c])], outputs=[b, c])


def test_liveness_views_extend_and_outputs_escape():
    bufs = liveness(_mm_chain())
    assert set(bufs) == {"a"}                    # c escapes (graph output); b is not an out= op
    assert (bufs["a"].start, bufs["a"].end) == (0, 3)
    assert bufs["a"].nbytes == 4 * 8 * 4


def _run(fn, *args, **options):
    torch._dynamo.reset()
    got = kiln.compile(fn, target="cpu", **options)(*args)
    torch.testing.assert_close(got, fn(*args), rtol=1e-4, atol=1e-5)
    return kiln.last_report()


def _mlp(x, w1, w2, w3):
    h = torch.relu(x @ w1)
    h = torch.sigmoid(h * 2.0 + 1.0)          # pointwise over h: may overwrite h in place
    return (h @ w2).tanh() @ w3


def _mlp_args():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in ((16, 32), (32, 64), (64, 32), (32, 8))]


def test_matmul_outputs_planned_and_correct():
    args = _mlp_args()
    rep = _run(_mlp, *args)
    assert rep.memory["arena_bytes"] > 0
    from kiln.passes.memory import out_variant
    assert out_variant("aten.mm.default") == "aten.mm.out"
    assert out_variant("aten.relu.default") is None


def _captured_graph(fn, args):
    """The kiln Graph captured for fn (inference), before any pass."""
    from kiln.ir.capture import dynamo_backend, from_fx
    graphs = []

    def keep(gm, ex, kind):
        graphs.append(from_fx(gm))
        return gm.forward
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=dynamo_backend(keep), dynamic=False)(*args)
    return graphs[0]


def _compiled_graph(fn, args, **options):
    """The planned graph kiln runs for fn (inference)."""
    g, _ = run_pipeline(_captured_graph(fn, args), kiln.Options(**{"target": "cpu", **options}), verify=True)
    return g


def test_in_place_reuse_recorded_valid_and_run():
    args = _mlp_args()
    g = _compiled_graph(_mlp, args)
    plan = g.meta["memory_plan"]
    assert plan.aliases, "the pointwise kernel over a dying matmul output should run in place"
    assert validate_plan(g, plan) == []
    for v, b in plan.aliases.items():
        assert b in plan.buffers and v not in plan.buffers
    from kiln.runtime import CompiledGraph
    from kiln.codegen import generate
    cg = CompiledGraph(g, generate(g, "cpu", kiln.Options().cache_dir))
    views = cg._arena_views(torch.device("cpu"))
    v, b = next(iter(plan.aliases.items()))
    assert views[v].data_ptr() == views[b].data_ptr()
    for _ in range(3):                             # first call writes aside, later ones in place
        torch.testing.assert_close(cg(*args)[0], _mlp(*args), rtol=1e-4, atol=1e-5)


def test_no_in_place_when_input_is_read_later_or_broadcast():
    def f(x, w):
        a = x @ w
        b = (a * 2).exp()                     # a is read again below: no reuse of a here
        return (b @ w.t()) + a.sum()

    def g_(x, w, v):
        a = x @ w
        return (a - v).relu() @ w.t()         # a - broadcast v has a's layout: may reuse a

    x, w, v = torch.randn(8, 16), torch.randn(16, 16), torch.randn(16)
    gf = _compiled_graph(f, [x, w])
    plan = gf.meta["memory_plan"]
    assert "mm" not in plan.aliases.values()
    assert validate_plan(gf, plan) == []
    gg = _compiled_graph(g_, [x, w, v])
    assert list(gg.meta["memory_plan"].aliases.values()) == ["mm"]     # relu(mm + v) over mm
    _run(f, x, w)
    _run(g_, x, w, v)


def test_no_in_place_when_the_kernel_also_reads_a_transpose():
    def f(x, w):
        a = x @ w
        return (a + a.t()).relu() @ w

    x, w = torch.randn(16, 16), torch.randn(16, 16)
    g = _compiled_graph(f, [x, w])
    assert "mm" not in g.meta["memory_plan"].aliases.values()
    _run(f, x, w)


def test_cuda_target_never_in_place():
    g = _compiled_graph(_mlp, _mlp_args())
    g2 = plan_memory(g, kiln.Options(target="cuda"))
    assert g2.meta["memory_plan"].aliases == {}
    assert validate_plan(g2, g2.meta["memory_plan"]) == []


def test_plan_round_trips_through_dict():
    g = _compiled_graph(_mlp, _mlp_args(), planner="ilp")
    plan = g.meta["memory_plan"]
    back = MemoryPlan.from_dict(plan.to_dict())
    assert back.to_dict() == plan.to_dict()
    assert back.planner == "ilp" and back.aliases == plan.aliases
    assert all(b.offset % ALIGN == 0 for b in back.buffers.values())


def test_artifact_keeps_in_place_plan(tmp_path):
    from kiln.aot import compile_ahead
    from kiln.runtime import load, save

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2, self.w3 = (torch.nn.Parameter(t) for t in _mlp_args()[1:])

        def forward(self, x):
            return _mlp(x, self.w1, self.w2, self.w3)
    m, x = M().eval(), _mlp_args()[0]
    compiled, _ = compile_ahead(m, (x,), {"target": "cpu"})
    assert compiled.plan.aliases
    save(compiled, tmp_path / "a")
    loaded = load(tmp_path / "a")
    assert loaded.plan.to_dict() == compiled.plan.to_dict()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], m(x), rtol=1e-4, atol=1e-5)


def test_fusion_does_not_hold_big_tensors_alive():
    """Per-layer reductions summed across layers: merging every sum into one kernel at the end
    would keep each layer's 2 MiB activation alive until the last layer; fusion refuses."""
    def f(x, w1, w2, w3, w4):
        t, acc = x, 0
        for w in (w1, w2, w3, w4):
            m = t @ w
            acc = acc + m.sum(0)
            t = m.tanh()
        return acc

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(1024, 512, generator=g)] + [torch.randn(512, 512, generator=g) / 16 for _ in range(4)]
    plan = _compiled_graph(f, args).meta["memory_plan"]
    assert plan.peak_bytes <= 2 * 1024 * 512 * 4 + 4096, plan.peak_bytes     # 5 * 2 MiB when merged
    torch._dynamo.reset()                      # sums of 1024 rows reach ~300: fp32 noise, not atol 1e-5
    got, want = kiln.compile(f, target="cpu")(*args), f(*[a.double() for a in args])
    assert (got.double() - want).abs().max() <= 2 * (f(*args).double() - want).abs().max() + 1e-5


def _ln_residual(x, w):
    y = x @ w                                   # dies in the layer-norm kernel below
    r = y * 2 + 1                               # stored per element: may overwrite y
    n = torch.nn.functional.layer_norm(r, (w.shape[1],))
    return n @ w.t() + r @ w.t()


@pytest.mark.parametrize("d", [512, 9000], ids=["one_pass", "multi_pass"])
def test_reduction_kernel_in_place_on_triton(d):
    """Triton reduction kernels store per-element outputs only in their final pass over a row,
    so one may overwrite an input there; checked against eager for rows kept in registers and
    rows walked in several loops (d > RBLOCK_MAX)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 4, generator=g), torch.randn(4, d, generator=g)
    gr = _compiled_graph(_ln_residual, [x, w], target="triton")
    plan = gr.meta["memory_plan"]
    kinds = {n.outputs[0].name: n.attrs.get("kind") for n in gr.nodes}
    reduced = [v for v in plan.overwrites if any(v in [o.name for o in n.outputs] and n.attrs.get("kind") == "reduction"
                                                  for n in gr.nodes)]
    assert reduced, (plan.overwrites, kinds)
    assert validate_plan(gr, plan) == []
    torch._dynamo.reset()
    got = kiln.compile(_ln_residual, target="triton")(x, w)
    torch.testing.assert_close(got, _ln_residual(x, w), rtol=1e-4, atol=1e-3)
    assert "mm" not in _compiled_graph(_ln_residual, [x, w], target="cpu").meta["memory_plan"].overwrites.values()


def test_dynamic_mode_when_the_arena_would_cost_more(monkeypatch):
    """A held arena plus the 2 MiB output exceeds what freeing each tensor at its last use needs:
    the plan has no arena, the kernel still writes over the dying matmul output, results match.
    The sigmoid, an output (so never in the arena), writes over the last matmul's output too.
    (Dynamic mode is for caching allocators, CUDA's; here the CPU stands in for one.)"""
    import kiln.passes.memory as memory

    def f(x, w1, w2):
        h = torch.relu(x @ w1) * 2.0
        return (h @ w2).sigmoid()

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2048, 256, generator=g), torch.randn(256, 1024, generator=g) / 16,
            torch.randn(1024, 256, generator=g) / 16]
    assert _compiled_graph(f, args).meta["memory_plan"].mode == "arena"     # the CPU keeps its arena
    monkeypatch.setattr(memory, "DYNAMIC_DEVICES", ("cuda", "cpu"))
    gr = _compiled_graph(f, args)
    plan = gr.meta["memory_plan"]
    assert plan.mode == "dynamic" and plan.arena_bytes == 0 and plan.overwrites == {"mul": "mm", "sigmoid": "mm_1"}
    peak = (2048 * 1024 + 2048 * 256) * 4              # h and h @ w2 live at once
    assert plan.device_bytes == peak == plan.greedy_bytes   # the arena would add the output on top
    assert validate_plan(gr, plan) == []
    assert MemoryPlan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    from kiln.codegen import generate
    from kiln.runtime import CompiledGraph
    cg = CompiledGraph(gr, generate(gr, "cpu", kiln.Options().cache_dir))
    for _ in range(2):
        torch.testing.assert_close(cg(*args)[0], f(*args), rtol=1e-4, atol=1e-5)


def _wide_tail(x, w1, w2, w3):
    """Small intermediates, then a last matmul 64x wider: an arena held to the end costs more."""
    h = torch.relu(x @ w1) * 2.0
    return torch.tanh(h @ w2) @ w3


def _wide_tail_args():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g),
            torch.randn(64, 64, generator=g), torch.randn(64, 4096, generator=g)]


def test_training_graphs_take_dynamic_mode_when_lower_at_all(monkeypatch):
    """An arena held to the end costs a training forward its dead intermediates while the last,
    large output is written (BERT's MLM head: the logits). Dynamic mode saves only ~2% here, under
    the inference margin, but a training graph without a budget takes it; with a budget (the tier
    plan accounts for the arena) it keeps the arena."""
    import kiln.passes.memory as memory

    f, args = _wide_tail, _wide_tail_args()
    captured = _captured_graph(f, args)
    monkeypatch.setattr(memory, "DYNAMIC_DEVICES", ("cuda", "cpu"))
    modes = {}
    for kind, budget in (("inference", None), ("forward", None), ("forward", 1 << 30)):
        graph = captured.copy()
        graph.meta["graph_kind"] = kind
        opts = kiln.Options(target="cpu", memory_budget=budget)
        planned, _ = run_pipeline(graph, opts, verify=True)
        plan = planned.meta["memory_plan"]
        modes[kind, budget] = plan.mode
        assert validate_plan(planned, plan) == []
    arena, total = memory.arena_plan(run_pipeline(captured.copy(), kiln.Options(target="cpu"))[0])
    assert 0 < arena.device_bytes - total < memory.DYNAMIC_MARGIN[1] * arena.device_bytes
    assert modes == {("inference", None): "arena", ("forward", None): "dynamic", ("forward", 1 << 30): "arena"}


def test_a_scalar_elsewhere_does_not_keep_a_graph_off_dynamic_mode(monkeypatch):
    """A 0-d value on another device (on a GPU: a CPU scalar_tensor's arithmetic) is a number,
    not storage: the graph's mode follows its tensors. A value of rank 1 there does count (the
    CPU stands in for CUDA's caching allocator, "cuda" for the other device)."""
    import dataclasses

    import kiln.passes.memory as memory

    f, args = _wide_tail, _wide_tail_args()
    opts = kiln.Options(target="cpu")
    planned, _ = run_pipeline(_captured_graph(f, args), opts)
    planned.meta["graph_kind"] = "forward"
    monkeypatch.setattr(memory, "DYNAMIC_DEVICES", ("cpu",))
    modes = {}
    for shape in ((), (1,)):
        t = dataclasses.replace(TensorType.of(torch.zeros(shape)), device="cuda")
        s = Node("aten.scalar_tensor.default" if not shape else "aten.zeros.default", (1.0,) if not shape else ([1],),
                 {}, [Value("elsewhere", t)])
        modes[shape] = plan_memory(planned.copy([s, *planned.nodes]), opts).meta["memory_plan"].mode
    assert modes == {(): "dynamic", (1,): "arena"}


def test_allocator_grain_counts_each_block():
    """On a caching allocator every tensor takes whole 512-byte blocks: both modes' estimates
    count them, so 64-byte-aligned arena packing is not mistaken for a saving on small graphs."""
    import kiln.passes.memory as memory
    planned, _ = run_pipeline(_captured_graph(_mlp, _mlp_args()), kiln.Options(target="cpu"))
    exact, total = memory.arena_plan(planned)
    blocks, total_blocks = memory.arena_plan(planned, grain=memory.ALLOC_GRAIN)
    assert blocks.device_bytes % memory.ALLOC_GRAIN == 0 and total_blocks % memory.ALLOC_GRAIN == 0
    assert blocks.device_bytes >= exact.device_bytes and total_blocks >= total


def _transient(fn, args, **options):
    from kiln.codegen import generate
    from kiln.runtime import CompiledGraph
    g = _compiled_graph(fn, args, **options)
    assert g.meta["memory_plan"].arena_bytes > 0
    return CompiledGraph(g, generate(g, "cpu", kiln.Options().cache_dir), transient_arena=True)


@pytest.mark.parametrize("kernels", [False, True])
def test_transient_arena_keeps_its_views_and_gives_its_memory_back(kernels):
    """A training graph's arena is empty between calls, its views kept over the storage (resized
    back at the next call): written by ATen out= steps, and by numba kernels (which read it as
    numpy arrays without pinning the storage)."""
    fn = _mlp if kernels else (lambda x, w1, w2, w3: ((x @ w1).tanh() @ w2) @ w3)  # noqa: E731
    args, cpu = _mlp_args(), torch.device("cpu")
    cg = _transient(fn, args, fusion=kernels)
    views = None
    for _ in range(3):
        torch.testing.assert_close(cg(*args)[0], fn(*args), rtol=1e-4, atol=1e-5)
        assert cg._arena[cpu].untyped_storage().nbytes() == 0
        assert views is None or cg._views[cpu] is views
        views = cg._views[cpu]


def test_transient_arena_views_of_its_buffers_are_kept():
    """Views of a transient arena's buffers (transposes between matmuls) are made once and kept:
    they follow the storage when it is resized back."""
    from kiln.runtime.executor import VIEW
    fn = lambda x, w1, w2, w3: (((x @ w1).t() @ x).t() @ w2) @ w3  # noqa: E731
    args = _mlp_args()
    cg = _transient(fn, args, fusion=False)
    for _ in range(3):
        torch.testing.assert_close(cg(*args)[0], fn(*args), rtol=1e-4, atol=1e-5)
    kept = [cg._kept[i] for i, st in enumerate(cg._steps) if st[0] is VIEW]
    assert kept and all(k is not None for k in kept)


def test_transient_arena_that_cannot_resize_is_made_each_call():
    """A storage something pinned (``Tensor.numpy()`` marks it unresizable) is dropped after
    each call and made again, views and all."""
    args, cpu = _mlp_args(), torch.device("cpu")
    cg = _transient(_mlp, args)
    cg(*args)
    pinned = cg._arena[cpu][:0].numpy()     # noqa: F841 - pins the arena's storage
    for _ in range(3):
        torch.testing.assert_close(cg(*args)[0], _mlp(*args), rtol=1e-4, atol=1e-5)
        assert cpu not in cg._arena and cpu not in cg._views
    assert cg._resizable[cpu] is False

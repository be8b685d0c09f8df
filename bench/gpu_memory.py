"""Peak device memory of kiln against eager PyTorch (its caching allocator), inference and one
training step, on transformers models (GPT-2, Llama, BERT; fp32 unless --dtype) and the model zoo:

    PYTHONPATH=$PWD python bench/gpu_memory.py [--json out.json] [--small] [--only gpt2,zoo] [--dtype bfloat16]

In bf16 the models' attention runs cuDNN's kernels (codegen/attention_aten.py), whose outputs
cuDNN allocates itself for the length of the call.

Processes do not share the allocator's statistics, so ``--only`` lets several run side by side.

Peak = torch.cuda.max_memory_allocated() during the measured call minus the bytes allocated
before anything was compiled (weights and inputs), so kiln's arenas, which persist between
calls, count in full. kiln is warmed up (compile, autotune, two calls) before it is measured;
the training step is forward + backward with gradients set to None before each step.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "passes"))

from kiln.api import kiln_backend  # noqa: E402

# CUDA graph replay off: a captured graph keeps its tensors in a private pool that the
# allocator's peak statistics do not see during replay, so the figures would flatter kiln
OPTIONS = {"target": "triton", "cudagraphs": False}


MODELS = ("gpt2", "llama", "bert", "zoo")       # what --only takes: configs() and the test zoo


def configs(small: bool) -> dict:
    import transformers
    transformers.logging.set_verbosity_error()
    d, layers, seq, batch = (128, 2, 64, 2) if small else (512, 4, 512, 8)
    vocab = 8192
    ids = lambda: {"input_ids": torch.randint(0, vocab, (batch, seq), device="cuda")}  # noqa: E731
    return {
        "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=layers, n_embd=d, n_head=8, vocab_size=vocab, n_positions=seq,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)), ids),
        "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=d, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
            intermediate_size=4 * d, vocab_size=vocab, max_position_embeddings=seq)), ids),
        "bert": (lambda: transformers.BertForMaskedLM(transformers.BertConfig(
            hidden_size=d, num_hidden_layers=layers, num_attention_heads=8, intermediate_size=4 * d,
            vocab_size=vocab, max_position_embeddings=seq, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)), ids),
    }


class Logits(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, *args, **kw):
        out = self.m(*args, **kw)
        return out if isinstance(out, torch.Tensor) else out.logits


def warm_workspaces() -> None:
    """Make cuBLAS and cuBLASLt allocate their per-stream workspaces now. They are allocated once
    per process through the caching allocator and kept for good, so whichever of eager and kiln
    first calls a library entry point the other did not use (kiln: ``mm`` plus a fused epilogue;
    eager: ``addmm``) would otherwise be charged the workspace (8 MiB on an H200) as if the model
    needed it."""
    a = torch.randn(64, 64, device="cuda")
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = a.to(dt)
        torch.mm(x, x), torch.addmm(x[0], x, x), torch.bmm(x[None], x[None])
    torch.cuda.synchronize()


def peak(step, base: int) -> int:
    """Peak bytes allocated during ``step()`` above ``base``."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def step_of(model, args, kw, train: bool, fn):
    """One step of ``fn`` (the model or its compiled form) as measured: a training step (grads
    cleared, forward, sum, backward) or a no_grad forward."""
    def run():
        if train:
            for p in model.parameters():
                p.grad = None
            fn(*args, **kw).float().sum().backward()
        else:
            with torch.no_grad():
                fn(*args, **kw)
    return run


@contextlib.contextmanager
def library_attention():
    """Counts the attention calls that ran an ATen (cuDNN, flash) kernel during the block: [n]."""
    from kiln.codegen import attention_aten as aa
    calls, saved = [0], (aa.run, aa.run_backward)

    def counted(fn):
        def inner(*a, **k):
            calls[0] += 1
            return fn(*a, **k)
        return inner
    aa.run, aa.run_backward = counted(aa.run), counted(aa.run_backward)
    try:
        yield calls
    finally:
        aa.run, aa.run_backward = saved


def measure(make_model, make_inputs, train: bool, dtype: torch.dtype = torch.float32) -> dict:
    torch.manual_seed(0)
    model = Logits(make_model()).to("cuda", dtype).train(train)
    args, kw = make_inputs()
    args = [a.to(dtype) if a.is_floating_point() else a for a in args]
    if train:
        args = [a.requires_grad_(a.is_floating_point()) for a in args]

    step = functools.partial(step_of, model, args, kw, train)
    warm_workspaces()
    torch.cuda.synchronize()
    gc.collect()
    base = torch.cuda.memory_allocated()
    step(model)()                                     # eager warm-up
    eager = peak(step(model), base)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=functools.partial(kiln_backend, options=OPTIONS))
    for _ in range(2):
        step(compiled)()
    with library_attention() as calls:
        ours = peak(step(compiled), base)
    with torch.no_grad():
        ref, got = model(*args, **kw), compiled(*args, **kw)
    err = ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
    del compiled
    torch._dynamo.reset()
    return {"eager": eager, "kiln": ours, "rel_err": err, "library_attention_calls": calls[0]}


def zoo_cases() -> dict:
    from memory_graphs import zoo
    ZOO, build = zoo()

    def make(name):
        def model():
            return build(name)[0]

        def inputs():
            xs = build(name)[1]
            return [x.cuda() for x in xs], {}
        return model, inputs
    return {f"zoo:{n}": make(n) for n in ZOO if n != "custom_op"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--small", action="store_true", help="small configs (a quick check)")
    ap.add_argument("--only", help="comma-separated models to run: gpt2, llama, bert, zoo (default: all)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="the models' parameters and floating inputs (default: float32)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    only = set(args.only.split(",")) if args.only else None
    if only and only - set(MODELS):
        ap.error(f"--only: unknown model(s) {', '.join(sorted(only - set(MODELS)))}; choose from {', '.join(MODELS)}")
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    cases = {}
    for name, (mk, ins) in configs(args.small).items():
        cases[name] = (mk, lambda ins=ins: ((), ins()))
    cases.update(zoo_cases())
    rows = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}")
    print("| model | graph | eager peak | kiln peak | kiln / eager | rel. err | ATen attention calls |")
    print("|---|---|---|---|---|---|---|")
    for name, (mk, ins) in cases.items():
        if only and name.split(":")[0] not in only:
            continue
        for train in (False, True):
            r = {"model": name, "graph": "train step" if train else "inference"}
            try:
                r.update(measure(mk, ins, train, dtype))
            except Exception as e:             # report and go on: one model's failure is a row
                torch._dynamo.reset()
                print(f"| {name} | {r['graph']} | failed: {type(e).__name__}: {str(e).splitlines()[0][:160]} ||||||")
                continue
            rows.append({**r, "dtype": args.dtype})
            print(f"| {name} | {r['graph']} | {r['eager']:,} | {r['kiln']:,} | {r['kiln'] / max(r['eager'], 1):.3f} "
                  f"| {r['rel_err']:.1e} | {r['library_attention_calls']} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

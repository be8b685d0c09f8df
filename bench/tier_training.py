"""Training steps under a memory budget (issue 4), target cpu: per model, the smallest
``memory_budget`` a training step (forward + backward) compiles and runs in, found from what the
BudgetErrors name, and two SGD steps at 30% of the weights checked against eager. Byte counts
(what the runtime measured on the device tier, after every step), not times:

    PYTHONPATH=$PWD python bench/tier_training.py [--models stack4,gpt2-4] [--json out.json]

Columns: weight bytes; the smallest budget (and as a share of the weights) with the device
bytes the runtime measured at that budget (forward / backward); at 30% of the weights whether
two SGD steps match eager (outputs and gradients, float32 tolerances), the device maximum
measured, and per step the bytes loaded into the device pool, spilled to the host (saved
activations, gradients) and the planner's simulated seconds (forward + backward).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kiln.runtime.tiers import TierRuntime  # noqa: E402

_made: list = []
_init = TierRuntime.__init__


def _record(self, *a, **kw):
    _init(self, *a, **kw)
    _made.append(self)


TierRuntime.__init__ = _record


class _Logits(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        return self.m(input_ids=ids).logits


def _hf(kind: str, layers: int):
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "gpt2":
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=layers, n_embd=128, n_head=4, vocab_size=256, n_positions=32, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    else:
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=128, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, vocab_size=256, max_position_embeddings=32))
    return _Logits(m), torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))


def _stack(layers: int):
    from tests.tiers.common import stack
    m, (x,) = stack(layers=layers)
    return m, x


MODELS = {"stack4": lambda: _stack(4), "stack6": lambda: _stack(6),
          "gpt2-2": lambda: _hf("gpt2", 2), "gpt2-4": lambda: _hf("gpt2", 4),
          "llama-2": lambda: _hf("llama", 2), "llama-4": lambda: _hf("llama", 4)}


def _step(model, x, budget):
    """One forward + backward compiled at ``budget``; the runtimes' stats."""
    torch._dynamo.reset()
    _made.clear()
    f = torch.compile(model, backend="kiln", options={"target": "cpu", "memory_budget": budget})
    out = f(x)
    out.float().pow(2).mean().backward()
    return out, list(_made)


def smallest(model, x) -> tuple[int, list]:
    budget = 1
    for _ in range(8):
        try:
            _, rts = _step(copy.deepcopy(model).train(), x, budget)
            return budget, rts
        except Exception as e:       # Dynamo wraps the BudgetError
            m = re.search(r"use memory_budget >= (\d+)", str(e))
            if not m:
                raise
            budget = int(m.group(1))
    raise RuntimeError("no budget worked")


def at_30(model, x, wb: int) -> dict:
    budget = int(0.3 * wb)
    model = copy.deepcopy(model).train()
    ref = copy.deepcopy(model)
    try:
        torch._dynamo.reset()
        _made.clear()
        f = torch.compile(model, backend="kiln", options={"target": "cpu", "memory_budget": budget})
        ok = True
        for _ in range(2):
            out, rout = f(x), ref(x)
            ok &= torch.allclose(out, rout, rtol=1e-4, atol=1e-5)
            out.float().pow(2).mean().backward()
            rout.float().pow(2).mean().backward()
            for p, q in zip(model.parameters(), ref.parameters()):
                ok &= torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-5)
            with torch.no_grad():
                for m in (model, ref):
                    for p in m.parameters():
                        p -= 0.05 * p.grad
                        p.grad = None
        rts = list(_made)
        calls = max(rts[0].stats["calls"], 1)
        return {"budget": budget, "ok": bool(ok), "device_max": max(r.stats["max_device_bytes"] for r in rts),
                "loaded": sum(r.stats["loaded_bytes"] for r in rts) // calls,
                "spilled": sum(r.stats.get("spilled_bytes", 0) for r in rts) // calls,
                "sim_s": sum(r.s.sim["time_s"] for r in rts)}
    except Exception as e:
        m = re.search(r"use memory_budget >= (\d+)", str(e))
        return {"budget": budget, "ok": False, "error": f"needs {m.group(1)}" if m else str(e).splitlines()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help=f"comma-separated subset of {', '.join(MODELS)} (default: all)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    names = list(MODELS)
    if args.models:
        unknown = sorted(set(args.models.split(",")) - set(names))
        if unknown:
            ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(names)}")
        names = [n for n in names if n in args.models.split(",")]
    rows = []
    print("| model | weights B | smallest budget B (share) | device max there: fwd / bwd B | at 30%: matches eager "
          "| device max B | loaded B/step | spilled B/step | simulated ms/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        model, x = MODELS[name]()
        wb = sum(p.numel() * p.element_size() for p in model.parameters())
        least, rts = smallest(model, x)
        r30 = at_30(model, x, wb)
        row = {"model": name, "weights": wb, "smallest": least,
               "smallest_device_max": [r.stats["max_device_bytes"] for r in rts], "at_30": r30}
        rows.append(row)
        dm = " / ".join(f"{b:,}" for b in row["smallest_device_max"])
        tail = (f"{'yes' if r30['ok'] else 'NO'} | {r30['device_max']:,} | {r30['loaded']:,} | {r30['spilled']:,} "
                f"| {r30['sim_s'] * 1e3:.3f}") if "error" not in r30 else f"fails: {r30['error']} | | | |"
        print(f"| {name} | {wb:,} | {least:,} ({least / wb:.1%}) | {dm} | {tail} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Per-step time of tiny training steps, where host time is all there is: a BERT layer (hidden
64, 2x16 tokens) and a cross-entropy over 16 x 64 logits, forward + backward, eager vs Inductor
vs kiln (on a GPU with and without its CUDA-graph replay). Runs on the CPU too (target cpu).

    PYTHONPATH=$PWD python bench/host_train_step.py [--json PATH]
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_timer import best_us  # noqa: E402

import kiln  # noqa: E402


def cases(dev: str) -> dict:
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer
    torch.manual_seed(0)
    layer = BertLayer(BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=256,
                                 attn_implementation="eager")).to(dev).train()
    x = torch.randn(2, 16, 64, device=dev, requires_grad=True)
    logits = torch.randn(16, 64, device=dev, requires_grad=True)
    t = torch.randint(0, 64, (16,), device=dev)

    def bert(f):
        def step():
            out = f(x)
            out = out[0] if isinstance(out, tuple) else out
            torch.autograd.grad(out.square().mean(), [x, *layer.parameters()])
        return step

    def loss(f):
        return lambda: torch.autograd.grad(f(logits, t), logits)
    return {"bert_layer": (layer, bert), "cross_entropy": (lambda a, b: F.cross_entropy(a, b), loss)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    target = "triton" if dev == "cuda" else "cpu"
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__}
    for name, (fn, step_of) in cases(dev).items():
        impls = [("eager", fn), ("inductor", torch.compile(fn)), ("kiln", kiln.compile(fn, target=target))]
        if dev == "cuda":       # kiln replays launch-bound training graphs as CUDA graphs by default
            impls.append(("kiln_no_replay", kiln.compile(fn, target=target, cudagraphs=False)))
        for impl, f in impls:
            step = step_of(f)
            res[f"{name}_{impl}_us"] = best_us(step, 300, warmup=10)
            torch._dynamo.reset()
        print(f"{name}: " + ", ".join(f"{i} {res[f'{name}_{i}_us']:.1f} us" for i, _ in impls)
              + f" a step ({res['device']})", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

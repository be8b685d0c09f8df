"""Cross-entropy training step on the GPU: eager vs TorchInductor vs kiln, one process.
The loss over bf16 logits (rows x vocabulary, an LM head's) and its gradient: the forward reads
the logits once for the row statistics (kiln gathers the target's logit instead of writing the
log-softmax: passes/gather_sink.py), the backward writes the gradient in one kernel
(passes/one_hot.py). Roofline: the logits read twice (forward, backward) and the gradient
written once, at the copy bandwidth measured in the same run.

    PYTHONPATH=$PWD python bench/gpu_loss.py [--rows 4096 --cols 50257 --json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F


def loss_fn(x, t):
    return F.cross_entropy(x, t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=50257)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu_loss.py needs a CUDA GPU", file=sys.stderr)
        return 1
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_fusion import copy_bandwidth, do_bench, kiln
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(a.rows, a.cols, device="cuda", generator=g) * 4).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, a.cols, (a.rows,), device="cuda", generator=g)
    impls = {"eager": loss_fn, "inductor": torch.compile(loss_fn), "kiln": kiln.compile(loss_fn, target="triton")}
    bw = copy_bandwidth("cuda")         # the same basis as the other GPU rooflines (a 1 GiB copy)
    roof_ms = 3 * x.numel() * x.element_size() / bw * 1e3
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": a.rows, "cols": a.cols,
           "copy_bandwidth_GBps": bw / 1e9, "roofline_ms": roof_ms}
    want = torch.autograd.grad(loss_fn(x, t), x)[0].float()
    for name, f in impls.items():
        got = torch.autograd.grad(f(x, t), x)[0]
        res[f"{name}_max_err"] = (got.float() - want).abs().max().item()
        res[f"{name}_ms"] = do_bench(lambda: torch.autograd.grad(f(x, t), x), warmup=10, rep=50,
                                     return_mode="median")
        with torch.no_grad():       # the loss alone (an inference graph): the step less its backward
            f(x, t)                 # compiled here, not inside the timing
            res[f"{name}_forward_ms"] = do_bench(lambda: f(x, t), warmup=10, rep=50, return_mode="median")
    print(f"{res['device']}, torch {res['torch']}: cross-entropy forward + backward, bf16 {a.rows}x{a.cols}; "
          f"copy bandwidth {bw / 1e12:.2f} TB/s, roofline {roof_ms:.4f} ms")
    for name in impls:
        print(f"  {name}: {res[name + '_ms']:.4f} ms ({roof_ms / res[name + '_ms']:.0%} of roofline; "
              f"the loss alone {res[name + '_forward_ms']:.4f} ms), max |grad - eager's| {res[name + '_max_err']:.2e}")
    print(f"  kiln / Inductor time: {res['kiln_ms'] / res['inductor_ms']:.2f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

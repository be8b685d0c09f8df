"""kiln's planned peak (the report's memory.peak_bytes) and kernel count per graph of one training
step of bench/gpu_memory.py's models, compiled for the CPU target (no GPU needed): what a change
to fusion or memory planning does to the plan, deterministically.

    PYTHONPATH=$PWD python bench/planned_peaks.py {gpt2,llama,bert} [small]
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import gpu_memory as G  # noqa: E402
import kiln  # noqa: E402,F401  (registers the backend)

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("model", choices=("gpt2", "llama", "bert"))
ap.add_argument("small", nargs="?", choices=("small",), help="the small configs")
a = ap.parse_args()
name, small = a.model, a.small is not None
torch.manual_seed(0)
make, _ = G.configs(small)[name]
model = G.Logits(make()).train()
seq, batch = (64, 2) if small else (512, 8)          # as gpu_memory.configs
x = torch.randint(0, 8192, (batch, seq))
rep = os.path.join(tempfile.mkdtemp(), "report.jsonl")
f = torch.compile(model, backend="kiln", options={"target": "cpu", "report": rep})
f(input_ids=x).float().sum().backward()
for line in open(rep):
    r = json.loads(line)
    print(name, r.get("graph_kind", "?"), "peak", r["memory"]["peak_bytes"], "arena", r["memory"]["arena_bytes"],
          "kernels", len(r.get("kernels", [])))

"""Online softmax (codegen/triton_gen.py, ONLINE_SOFTMAX) against the two walks it would replace,
on the long-row cases of bench/gpu_fusion.py (LM-head softmax, log_softmax, cross-entropy), in one
process: device time (CUDA profile) and time by call (do_bench), each variant compiled twice in
alternation. Decides whether ONLINE_SOFTMAX goes on: it saves a walk of each row and pays a
second exp per element.

    python bench/online_softmax_ab.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_fusion as G  # noqa: E402  (sets a fresh KILN_CACHE_DIR before kiln is imported)
import kiln  # noqa: E402
import kiln.codegen.triton_gen as TG  # noqa: E402
from triton.testing import do_bench  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/online_softmax_ab.py needs a CUDA GPU")
    bw = G.copy_bandwidth("cuda")
    rows = []
    for name, fn, inputs, nbytes in G.long_row_cases("cuda")[:3]:
        roof = nbytes / bw * 1e3
        want = fn(*inputs)
        for online in (False, True, False, True):
            TG.ONLINE_SOFTMAX = online
            torch._dynamo.reset()
            f = kiln.compile(fn, target="triton")
            err = G.rel_err(f(*inputs), want)
            dev = G.device_ms(lambda: f(*inputs))
            call = do_bench(lambda: f(*inputs), warmup=25, rep=100, return_mode="median")
            rows.append({"case": name, "online": online, "device_ms": dev, "call_ms": call, "roofline_ms": roof,
                         "rel_err": err})
            print(f"{name}: {'online' if online else 'two walks'} device {dev:.4f} ms ({roof / dev:.0%} of roofline), "
                  f"by call {call:.4f} ms, rel err {err:.1e}", flush=True)
    TG.ONLINE_SOFTMAX = False
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

"""What the matmul pass made of a suite case: each kiln.matmul node's segments (products, fused
epilogue groups, stored outputs), which path runs it on an H100/H200 (cuBLAS or the Triton
template, as the untuned default picks), whether its cuBLAS path adds a bias itself (addmm, no
epilogue pass), its outputs' dtypes and layouts; ``--body`` prints the epilogue bodies. On a GPU it shows
the graph the GPU compiles (SDPA ops, attention layouts), which the CPU does not reproduce.

    PYTHONPATH=$PWD python bench/matmul_plans.py bert_layer [--body] [--small]
"""
import argparse
import gc
import os
import sys
import weakref

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases as C  # noqa: E402
import kiln  # noqa: E402
from kiln.codegen.matmul import _bias  # noqa: E402
from kiln.codegen.matmul_config import default_config  # noqa: E402
from kiln.runtime import CompiledGraph  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+", choices=sorted(C.CASES))
    ap.add_argument("--body", action="store_true")
    ap.add_argument("--small", action="store_true", help="the cases' small shapes (default on a CPU)")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    for name in a.cases:
        torch.manual_seed(0)
        fn, inputs = C.CASES[name][1](dev, a.small or dev == "cpu")
        torch._dynamo.reset()
        gc.collect()
        before = {id(o) for o in gc.get_objects() if type(o) is CompiledGraph}
        with torch.no_grad():
            kiln.compile(fn, target="triton", cudagraphs=False)(*inputs)
        graphs = [o for o in gc.get_objects() if not isinstance(o, weakref.ProxyType)
                  and type(o) is CompiledGraph and id(o) not in before]
        print(f"## {name}")
        for cg in graphs:
            for n in cg.graph.nodes:
                if n.op != "kiln.matmul":
                    continue
                nodes = {o.name: b for b in n.body.nodes for o in b.outputs}
                segs = n.attrs["plan"]["segments"]
                k = cg.kernels.get(n.outputs[0].name)
                cfg = (k.meta.get("config") or default_config(k.meta, interpret=False)) if k is not None else {}
                print(n.attrs["name"], "path:", "cuBLAS" if cfg.get("ATEN") else "Triton template",
                      "(untuned default)" if k is not None and not k.meta.get("config") else "",
                      "bias:", [_bias(s, n, nodes) for s in segs])
                for s in segs:
                    print("   segment", {k: s[k] for k in ("n", "acc", "groups", "stores", "lin")})
                for o in n.outputs:
                    print(f"   output {o.name}: {str(o.type.dtype).removeprefix('torch.')} {tuple(o.type.shape)} "
                          f"strides {tuple(o.type.strides)} offset {o.type.offset}")
                if a.body:
                    print(n.body)


if __name__ == "__main__":
    main()

"""Time the cuBLAS path's epilogue pass (MODE 2 of the matmul template: reads the cuBLAS products,
applies the fused epilogue, writes the outputs) over tile shapes, on the suite's epilogues:
Llama's SwiGLU (silu(gate) * up over two products), GPT-2's bias + tanh-GELU and bias + residual.
The call time of the whole kiln call is printed, and that of the same products through eager.

    PYTHONPATH=$PWD python bench/gpu_epilogue_pass.py
"""
import torch
import torch.nn.functional as F
from triton.testing import do_bench

import kiln
from kiln.codegen import matmul_launch as ml

CFGS = [(64, 64, 4), (32, 128, 4), (64, 128, 4), (64, 128, 8), (128, 128, 8), (32, 256, 4), (16, 256, 4), (64, 256, 8)]


def cases():
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, wg, wu = torch.randn(8192, 2048, **bf), torch.randn(5632, 2048, **bf) * 0.02, torch.randn(5632, 2048, **bf) * 0.02
    yield "swiglu 8192x2048->2x5632", (lambda x: F.silu(x @ wg.t()) * (x @ wu.t())), x
    h, w1, b1 = torch.randn(8192, 1024, **bf), torch.randn(4096, 1024, **bf) * 0.02, torch.randn(4096, **bf)
    yield "bias+gelu(tanh) 8192x1024->4096", (lambda h: F.gelu(F.linear(h, w1, b1), approximate="tanh")), h
    m, w2, b2, r = torch.randn(8192, 4096, **bf), torch.randn(1024, 4096, **bf) * 0.02, torch.randn(1024, **bf), torch.randn(8192, 1024, **bf)
    yield "bias+residual 8192x4096->1024", (lambda m: F.linear(m, w2, b2) + r), m


def main():
    base = dict(ml.EPILOGUE_CFG)
    for name, fn, x in cases():
        torch._dynamo.reset()
        with torch.no_grad():
            f = kiln.compile(fn, target="triton", cudagraphs=False)
            ref = fn(x)
            torch.testing.assert_close(f(x).float(), ref.float(), rtol=3e-2, atol=3e-2)
            eager = do_bench(lambda: fn(x), warmup=25, rep=200, return_mode="median")
            print(f"{name}: eager {eager:.4f} ms")
            for bm, bn, w in CFGS:
                ml.EPILOGUE_CFG = {**base, "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w}
                f(x)
                t = do_bench(lambda: f(x), warmup=25, rep=200, return_mode="median")
                print(f"  BLOCK_M {bm:3d} BLOCK_N {bn:3d} warps {w}: {t:.4f} ms")
            ml.EPILOGUE_CFG = base


if __name__ == "__main__":
    main()

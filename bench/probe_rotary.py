"""Why kiln's rotary kernel for Llama's q ran at ~3.1 TB/s where a copy runs at ~4.3: the kernel
kiln generates and variants of it side by side (iteration order, how the cat's where is loaded).

    python bench/probe_rotary.py     (a GPU)

q is [B, S, H, D] in memory, read and written as the transposed [B, H, S, D] with the rotated
halves cat((-x2, x1)) * sin + q * cos, cos and sin [B, S, D] (transformers' Llama).
ORDER 0: elements in the logical (transposed) order, as kiln walks them; 1: in memory order.
LOADS 0: both halves loaded for every element and the cat's condition loaded from a [2] bool
tensor (kiln's lowering); 1: the condition from the index; 2: each half loaded under its mask;
3: one load of the partner element at +-D/2.
"""
import json, sys
import torch, triton, triton.language as tl
from probe_dual_dot import bench


@triton.jit
def rotary(q, cos, sin, pick, out, XN: tl.constexpr, S: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
           XBLOCK: tl.constexpr, ORDER: tl.constexpr, LOADS: tl.constexpr):
    x = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)
    HALF: tl.constexpr = D // 2
    i = x % HALF
    half = (x // HALF) % 2
    if ORDER == 0:
        b = x // (H * S * D)
        h = (x // (S * D)) % H
        s = (x // D) % S
        bs = b * S + s
    else:
        bs = x // (H * D)
        h = (x // D) % H
    lo = bs * (H * D) + h * D + i
    off = lo + half * HALF
    t = bs * D + half * HALF + i
    xq = tl.load(q + off).to(tl.float32)
    c = tl.load(cos + t).to(tl.float32)
    sn = tl.load(sin + t).to(tl.float32)
    first = half == 0
    if LOADS == 0:
        p = tl.load(pick + half)
        r = tl.where(p, -tl.load(q + lo + HALF).to(tl.float32), tl.load(q + lo).to(tl.float32))
    elif LOADS == 1:
        r = tl.where(first, -tl.load(q + lo + HALF).to(tl.float32), tl.load(q + lo).to(tl.float32))
    elif LOADS == 2:
        a = tl.load(q + lo + HALF, mask=first, other=0).to(tl.float32)
        bb = tl.load(q + lo, mask=half == 1, other=0).to(tl.float32)
        r = tl.where(first, -a, bb)
    else:
        pq = tl.load(q + off + tl.where(first, HALF, -HALF)).to(tl.float32)
        r = tl.where(first, -pq, pq)
    tl.store(out + off, (xq * c + r * sn).to(tl.bfloat16))


def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)


def eager(q, cos, sin):
    return q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)


def main(B=8, S=1024, H=32, D=64):
    dev = "cuda"
    qm = torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16)
    q = qm.transpose(1, 2)
    cos = torch.randn(B, S, D, device=dev, dtype=torch.bfloat16)
    sin = torch.randn(B, S, D, device=dev, dtype=torch.bfloat16)
    pick = torch.tensor([True, False], device=dev)
    ref = eager(q, cos, sin)
    n = qm.numel()
    rows = {}
    out = torch.empty_like(qm)
    copy_ms = bench(lambda: out.copy_(qm))
    rows["copy"] = copy_ms
    comp = torch.compile(eager)
    comp(q, cos, sin)
    rows["inductor"] = bench(lambda: comp(q, cos, sin))
    rows["eager"] = bench(lambda: eager(q, cos, sin))
    for order in (0, 1):
        for loads in (0, 1, 2, 3):
            for xb, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8)):
                def run():
                    rotary[(n // xb,)](qm, cos, sin, pick, out, n, S, H, D, XBLOCK=xb, ORDER=order, LOADS=loads,
                                       num_warps=w)
                run()
                err = (out.transpose(1, 2).float() - ref.float()).abs().max().item()
                rows[f"order{order} loads{loads} x{xb} w{w}"] = bench(run)
                assert err < 0.02 * ref.abs().max().item(), (order, loads, err)
    nbytes = 2 * qm.numel() * qm.element_size()
    for k, v in rows.items():
        print(f"{k:28s} {v:.4f} ms  {nbytes / v / 1e6:.0f} GB/s  {copy_ms / v:.2f} of copy")
    if len(sys.argv) > 1:
        json.dump(rows, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()

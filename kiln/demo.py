"""``kiln demo``: compile a small built-in transformer with kiln, check it against eager and
time both in the same process."""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

RTOL = 1e-4            # fp32 tolerance for the eager comparison
ATOL = 1e-4


@dataclass(frozen=True)
class DemoConfig:
    vocab: int = 1000
    d_model: int = 256
    heads: int = 4
    layers: int = 2
    seq: int = 128
    batch: int = 4
    mlp_ratio: int = 4


FULL = DemoConfig()
SMALL = DemoConfig(vocab=200, d_model=64, heads=4, layers=2, seq=32, batch=2)


class Block(nn.Module):
    """Pre-norm decoder block: causal self-attention (matmul + softmax) and a GELU MLP."""
    def __init__(self, cfg: DemoConfig):
        super().__init__()
        d = cfg.d_model
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.mlp_ratio * d)
        self.fc2 = nn.Linear(cfg.mlp_ratio * d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h, hd = self.heads, d // self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q = q.reshape(b, s, h, hd).transpose(1, 2)
        k = k.reshape(b, s, h, hd).transpose(1, 2)
        v = v.reshape(b, s, h, hd).transpose(1, 2)
        att = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        att = att.masked_fill(mask[:s, :s], float("-inf"))
        att = torch.softmax(att, dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(y)
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return x


class TinyTransformer(nn.Module):
    """Token + position embeddings, ``layers`` decoder blocks, final layernorm, vocab head."""
    def __init__(self, cfg: DemoConfig = FULL):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.register_buffer("mask", torch.triu(torch.ones(cfg.seq, cfg.seq, dtype=torch.bool), 1),
                             persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        s = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(s, device=ids.device))
        for blk in self.blocks:
            x = blk(x, self.mask)
        return self.head(self.ln_f(x))


def make(cfg: DemoConfig = FULL, device: str = "cpu", seed: int = 0):
    """(model, example_inputs): also usable as a spec, ``kiln compile kiln.demo:make``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyTransformer(cfg).eval().to(device)
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(device)
    return model, (ids,)


def make_small():
    return make(SMALL)


def _median_ms(fn, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _replay_status() -> str:
    """What the CUDA graph runners of the demo's compiled graphs did (empty off the GPU)."""
    from kiln.runtime.cudagraphs import live_runners
    return "; ".join(sorted({r.describe() for r in live_runners()}))


def run(target: str = "auto", steps: int = 10, small: bool = False, out=None) -> int:
    """Compile, check and time the demo model; returns the process exit status (0 = match)."""
    out = out or sys.stdout
    import kiln
    from kiln.options import Options

    resolved = Options(target=target).resolved_target()
    device = "cuda" if resolved in ("triton", "cuda") and torch.cuda.is_available() else "cpu"
    cfg = SMALL if small else FULL
    model, inputs = make(cfg, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"kiln demo: {cfg.layers}-block transformer (d_model {cfg.d_model}, {cfg.heads} heads, "
          f"seq {cfg.seq}, batch {cfg.batch}, vocab {cfg.vocab}; {n_params / 1e6:.2f}M params) "
          f"on {device}, target {resolved}", file=out)

    with torch.no_grad():
        expected = model(*inputs)
        t0 = time.perf_counter()
        # on a GPU the demo model is launch-bound: replay it as a CUDA graph
        compiled = kiln.compile(model, target=target, cudagraphs=device == "cuda")
        got = compiled(*inputs)
        sync()
        compile_s = time.perf_counter() - t0
        report = kiln.last_report()

        err = (got.float() - expected.float()).abs().max().item()
        ok = torch.allclose(got, expected, rtol=RTOL, atol=ATOL)
        if report is not None:
            print(report.summary(), file=out)
        print(f"check vs eager: max abs err {err:.3g} "
              f"({'ok' if ok else 'MISMATCH'} at rtol={RTOL:g}, atol={ATOL:g})", file=out)
        if not ok:
            print("kiln demo: compiled outputs do not match eager", file=sys.stderr)
            return 1

        steps = max(int(steps), 1)
        warmup = min(3, steps)
        eager_ms = _median_ms(lambda: model(*inputs), steps, warmup, sync)
        kiln_ms = _median_ms(lambda: compiled(*inputs), steps, warmup, sync)
    print(f"compile: {compile_s:.2f}s (capture + passes + codegen + first run)", file=out)
    print(f"time per forward (median of {steps} after {warmup} warm-up): eager {eager_ms:.2f} ms, "
          f"kiln {kiln_ms:.2f} ms -> speed-up {eager_ms / kiln_ms:.2f}x", file=out)
    replay = _replay_status()
    if replay:
        print(replay, file=out)
    return 0

"""Per-call host time of a small callable: best of 5 rounds of ``n`` calls, synchronising the
device around each round (bench/gpu_host_breakdown.py, bench/host_tiny_bert.py)."""
import time

import torch


def best_us(f, n: int, warmup: int = 0) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        f()
    best = 1e9
    for _ in range(5):
        sync()
        t = time.perf_counter()
        for _ in range(n):
            f()
        sync()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best

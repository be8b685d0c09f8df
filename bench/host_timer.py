"""Per-call host time of a small callable: best of 5 rounds of ``n`` calls, synchronising the
device around each round (bench/gpu_host_breakdown.py, bench/host_tiny_bert.py); ``issue_us``
leaves the device's drain out of the timed span (bench/gpu_host_sizes.py, bench/gpu_host_gemv.py)."""
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


def issue_us(f, n: int, rounds: int = 7) -> float:
    """The host's time to issue one call back to back: the device is drained before each round
    and after it, outside the timed span."""
    best = 1e9
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t0) / n)
        torch.cuda.synchronize()
    return best * 1e6

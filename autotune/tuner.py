"""In-process tuning of Triton launch configs: candidates from the kernel's config space are
timed on the real inputs (warm-up, median) and the winner is remembered on disk, keyed by the
kernel source hash, problem size and device, so a second compile does not tune again."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time

from .heuristics import next_pow2

_MEM: dict[str, dict] = {}


def config_space(kind: str, xnumel: int, rnumel: int, one_pass: bool) -> list[dict]:
    if kind == "pointwise":
        return [{"XBLOCK": xb, "RBLOCK": 1, "num_warps": w}
                for xb in (512, 1024, 2048, 4096) for w in (4, 8) if xb <= max(next_pow2(xnumel), 512)]
    if one_pass:
        rb = next_pow2(max(rnumel, 1))
        out = []
        for xb in (1, 2, 4, 8, 16, 32, 64):
            if xb * rb > 16384 or xb > next_pow2(xnumel):
                continue
            for w in (2, 4, 8, 16, 32):
                per_thread = xb * rb // (32 * w)
                if 1 <= per_thread <= 64:
                    out.append({"XBLOCK": xb, "RBLOCK": rb, "num_warps": w})
        return out or [{"XBLOCK": 1, "RBLOCK": rb, "num_warps": 4}]
    return [{"XBLOCK": xb, "RBLOCK": rb, "num_warps": w}
            for xb in (1, 2) for rb in (1024, 2048, 4096) for w in (4, 8, 16) if xb * rb <= 8192]


def _db_path(cache_dir: str) -> str:
    return os.path.join(cache_dir, "tuning.json")


def _key(source: str, xnumel: int, rnumel: int, device: str) -> str:
    import torch
    import triton
    h = hashlib.sha256(source.encode()).hexdigest()[:20]
    return f"{h}|{xnumel}|{rnumel}|{device}|torch{torch.__version__}|triton{triton.__version__}"


def lookup(cache_dir: str, key: str) -> dict | None:
    if key in _MEM:
        return _MEM[key]
    try:
        with open(_db_path(cache_dir)) as f:
            cfg = json.load(f).get(key)
    except (OSError, ValueError):
        return None
    if cfg:
        _MEM[key] = cfg
    return cfg


def remember(cache_dir: str, key: str, cfg: dict) -> None:
    _MEM[key] = cfg
    path = _db_path(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    try:
        with open(path) as f:
            db = json.load(f)
    except (OSError, ValueError):
        db = {}
    db[key] = cfg
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(db, f, indent=0)
    os.replace(tmp, path)


def tune(run, candidates: list[dict]) -> tuple[dict, float]:
    """``run(cfg)`` launches once. Returns (best config, seconds spent tuning)."""
    from triton.testing import do_bench
    t0 = time.perf_counter()
    best, best_ms = None, float("inf")
    for cfg in candidates:
        try:
            ms = do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median")
        except Exception:       # a config the compiler rejects (resources) is simply skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best or candidates[0], time.perf_counter() - t0

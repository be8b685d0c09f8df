"""Config spaces and constraint pruning, with device limits passed in (no GPU needed)."""
import dataclasses

import pytest
import torch

from kiln.autotune.space import (Config, DeviceLimits, Estimate, Problem, Space, cdiv, divides, prune,
                                 register_space, SPACES)

H100 = DeviceLimits()


def test_config_round_trip():
    c = Config.make({"XBLOCK": 64, "RBLOCK": 1024}, num_warps=8)
    assert c["XBLOCK"] == 64 and c.as_dict() == {"XBLOCK": 64, "RBLOCK": 1024, "num_warps": 8}
    assert Config.from_dict(c.as_dict()) == c
    s = Config.make({"BLOCK_M": 64}, num_warps=4, num_stages=3)
    assert Config.from_dict(s.as_dict()) == s and s.as_dict()["num_stages"] == 3


@pytest.fixture
def tiles():
    """A matmul-like family registered through the public interface, as the matmul templates do."""
    def candidates(p):
        for bm in (16, 32, 48, 64, 128, 256):
            for bk in (32, 64, 128):
                for w in (2, 4, 8, 16, 64):
                    for s in (2, 3, 4, 5):
                        yield Config.make({"BLOCK_M": bm, "BLOCK_N": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)

    def estimate(c, p):
        M, N, K = p.dims["M"], p.dims["N"], p.dims["K"]
        bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
        return Estimate(programs=cdiv(M, bm) * cdiv(N, bn), threads=32 * c.num_warps,
                        smem_bytes=(bm * bk + bk * bn) * c.num_stages * p.itemsize,
                        regs_per_thread=32 + bm * bn // (32 * c.num_warps),
                        bytes_moved=p.itemsize * (M * K * cdiv(N, bn) + K * N * cdiv(M, bm) + M * N),
                        flops=2 * M * N * K, inflight_bytes=(bm + bn) * bk * c.num_stages * p.itemsize)

    register_space(Space("test_tiles", candidates, estimate,
                         rules=(("BLOCK_K divides K", divides("BLOCK_K", "K")),
                                ("BLOCK_M divides M", divides("BLOCK_M", "M")))))
    yield
    SPACES.pop("test_tiles", None)


def _check_all_kept(kept, p, lim):
    est = SPACES[p.family].estimate
    for c in kept:
        e = est(c, p)
        assert e.smem_bytes <= lim.smem_per_block and e.regs_per_thread <= 255
        assert 32 * c.num_warps <= lim.max_threads_per_block
        assert all(v & (v - 1) == 0 for k, v in c.params if "BLOCK" in k)


def test_pruning_rules(tiles):
    p = Problem("test_tiles", {"M": 4096, "N": 4096, "K": 96}, torch.bfloat16)
    kept, removed = prune(p, H100)
    assert kept and sum(removed.values()) + len(kept) == 6 * 3 * 5 * 4
    assert removed["block sizes and num_warps are powers of two"] > 0      # BLOCK_M 48
    assert removed["threads per program <= device max"] > 0              # 64 warps
    assert removed["BLOCK_K divides K"] > 0                                # 64, 128 into 96
    assert all(96 % c["BLOCK_K"] == 0 for c in kept)
    _check_all_kept(kept, p, H100)


def test_shared_memory_limit_follows_the_device(tiles):
    p = Problem("test_tiles", {"M": 4096, "N": 4096, "K": 4096}, torch.bfloat16)
    small = dataclasses.replace(H100, smem_per_block=48 * 1024, smem_per_sm=64 * 1024)
    big_kept, _ = prune(p, H100)
    small_kept, removed = prune(p, small)
    assert len(small_kept) < len(big_kept)
    assert removed["shared memory <= device limit"] > 0
    _check_all_kept(small_kept, p, small)
    # (128x64 + 64x128) x 2 bytes x 3 stages = 96 KiB: fits an H100, not a 48 KiB device
    c = Config.make({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3)
    assert c in big_kept and c not in small_kept


def test_register_limit(tiles):
    p = Problem("test_tiles", {"M": 4096, "N": 4096, "K": 4096}, torch.float16)
    kept, removed = prune(p, H100)
    assert removed["registers per thread <= 255"] > 0        # 256x256 tile on 2 warps: 1056 regs
    assert not any(c["BLOCK_M"] == 256 and c.num_warps == 2 for c in kept)


@pytest.mark.parametrize("x,r,one_pass", [(16384, 4096, True), (7, 33, True), (64, 100000, False)])
def test_reduction_space(x, r, one_pass):
    p = Problem("reduction", {"x": x, "r": r}, torch.bfloat16, {"bytes": 2 * x * r * 2, "one_pass": one_pass})
    kept, removed = prune(p, H100)
    assert kept
    _check_all_kept(kept, p, H100)
    for c in kept:
        if one_pass:
            assert c["RBLOCK"] >= r                         # the row fits in one block
        assert c["XBLOCK"] * c["RBLOCK"] >= 32 * c.num_warps


def test_pointwise_space_small_problem():
    p = Problem("pointwise", {"x": 100, "r": 1}, torch.float32)
    kept, _ = prune(p, H100)
    assert kept and all(c["XBLOCK"] <= 128 for c in kept)


def test_unknown_family():
    with pytest.raises(KeyError, match="no config space for kernel family 'nope'"):
        prune(Problem("nope", {}), H100)

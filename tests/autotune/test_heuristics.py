"""The launch configs chosen without timing for one-pass reductions: 64 bytes of the row per
thread (what the H200 sweeps in autotune/heuristics.py found best), short rows packed to 1024
elements a program, and two rows a program where every row also reads a shared row (weights)."""
import pytest

from kiln.autotune.heuristics import triton_config


@pytest.mark.parametrize("rows, cols, itemsize", [(16384, 4096, 2), (4096, 8192, 2), (32768, 768, 2),
                                                  (8192, 2048, 4), (262144, 128, 2), (65536, 512, 4)])
@pytest.mark.parametrize("shared", [False, True])
def test_reduction_threads_hold_64_bytes_of_the_row(rows, cols, itemsize, shared):
    c = triton_config("reduction", rows, cols, True, False, itemsize, shared)
    per_program = c["XBLOCK"] * c["RBLOCK"]
    assert c["RBLOCK"] >= cols and c["RBLOCK"] & (c["RBLOCK"] - 1) == 0
    assert per_program * itemsize == 64 * 32 * c["num_warps"] or c["num_warps"] in (1, 16)
    two = shared and cols * itemsize >= 2048 and c["RBLOCK"] <= 8192
    if c["RBLOCK"] < 1024:
        assert per_program == 1024
    else:
        assert c["XBLOCK"] == (2 if two else 1)


def test_interpreter_and_tiny_problems_stay_small():
    assert triton_config("reduction", 1, 4096, True, False, 2, True)["XBLOCK"] == 1     # one row: no pair
    c = triton_config("reduction", 3, 64, True, True)
    assert c["XBLOCK"] * c["RBLOCK"] <= 256 and c["num_warps"] == 1

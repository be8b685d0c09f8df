"""kiln.Options: validation with clear errors, byte-size parsing."""
import pytest
import torch

import kiln
from kiln import Options
from kiln.options import parse_bytes


@pytest.mark.parametrize("kw, names", [
    ({"target": "tpu"}, ["auto", "triton", "cuda", "cpu"]),
    ({"quantize": "int3"}, ["int8", "int4", "bfp8", "auto"]),
    ({"planner": "magic"}, ["greedy", "ilp", "rl"]),
    ({"cudagraphs": "yes"}, ["True", "False", "'auto'"]),
])
def test_bad_value_names_valid_choices(kw, names):
    with pytest.raises(ValueError) as e:
        Options(**kw)
    msg = str(e.value)
    assert "\n" not in msg
    for n in names:
        assert n in msg


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        Options.make({"targte": "cpu"})
    msg = str(e.value)
    assert "targte" in msg and "target" in msg and "memory_budget" in msg


def test_kiln_compile_rejects_unknown_option():
    with pytest.raises(ValueError, match="valid options"):
        kiln.compile(torch.nn.Linear(2, 2), bogus=1)


def test_bad_autotune():
    with pytest.raises(ValueError, match="autotune"):
        Options(autotune="sometimes")
    assert Options(autotune="http://tuner:8000").autotune == "http://tuner:8000"


@pytest.mark.parametrize("text, expected", [
    ("6GiB", 6 * 2**30), ("512MB", 512 * 10**6), ("512MiB", 512 * 2**20), (1 << 30, 1 << 30),
    ("1.5GiB", int(1.5 * 2**30)), ("4096", 4096), (" 2 kib ", 2048), ("3gb", 3 * 10**9),
])
def test_memory_budget_parses(text, expected):
    assert Options(memory_budget=text).memory_budget == expected
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", [-1, 0, "-1GiB", "lots", "6 GiBs", "", True, [1], "1e3"])
def test_memory_budget_rejects(bad):
    with pytest.raises(ValueError, match="memory_budget"):
        Options(memory_budget=bad)


def test_tiers():
    o = Options(tiers=["device", {"name": "host", "capacity": "64GiB", "bandwidth": "25GB"}])
    assert [t.name for t in o.tiers] == ["device", "host"]
    assert o.tiers[1].capacity == 64 * 2**30
    with pytest.raises(ValueError, match="device, host, disk"):
        Options(tiers=["moon"])
    with pytest.raises(ValueError, match="once"):
        Options(tiers=["device", "device"])


def test_defaults_and_resolved_target():
    o = Options()
    assert o.target == "auto" and o.quantize is None and o.planner == "greedy" and o.autotune is False
    assert o.cudagraphs == "auto"
    assert o.resolved_target() == ("triton" if torch.cuda.is_available() else "cpu")
    assert Options(target="cpu").resolved_target() == "cpu"

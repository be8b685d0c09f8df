"""The tier runtime on the CPU: at 30% of the weights the outputs match eager while the device
tier (a separate arena) never holds more than the budget; disk homes, parameters passed as
inputs (torch.compile), artifacts, the report, bad options and the CLI's --memory plot."""
from __future__ import annotations

import os

import pytest
import torch

import kiln
from kiln.aot import compile_ahead
from kiln.runtime.tiers import TierOverflow
from .common import stack, weight_bytes


@pytest.mark.parametrize("target,planner", [("cpu", "greedy"), ("cpu", "ilp"), ("triton", "greedy")])
def test_30_percent_budget_matches_eager(target, planner):
    model, (x,) = stack(layers=6)
    budget = int(0.3 * weight_bytes(model))
    compiled, report = compile_ahead(model, (x,), {"target": target, "memory_budget": budget, "planner": planner})
    with torch.no_grad():
        ref = model(x)
        for _ in range(2):                       # the second call reuses the pool and persistent weights
            torch.testing.assert_close(compiled(x)[0], ref)
    st = compiled._tiers.stats
    assert 0 < st["max_device_bytes"] <= budget
    assert st["loaded_bytes"] > 0.5 * weight_bytes(model)          # weights really moved
    mem = report.to_dict()["memory"]
    assert set(mem["per_tier"]) == {"device", "host", "disk"}
    assert mem["per_tier"]["device"] <= budget and mem["per_tier"]["host"] >= 0.9 * weight_bytes(model)
    assert mem["transfers_bytes"] > 0 and mem["peak_bytes"] >= 0 and mem["arena_bytes"] >= 0


def test_runtime_enforces_the_device_budget():
    model, (x,) = stack(layers=4)
    budget = int(0.4 * weight_bytes(model))
    compiled, _ = compile_ahead(model, (x,), {"target": "cpu", "memory_budget": budget})
    with torch.no_grad():
        compiled(x)
        compiled._tiers.s.budget = compiled._tiers.stats["max_device_bytes"] - 1     # pretend a smaller device
        with pytest.raises(TierOverflow, match="device tier holds"):
            compiled(x)


def test_default_path_has_no_tiers():
    model, (x,) = stack(layers=2)
    compiled, report = compile_ahead(model, (x,), {"target": "cpu"})
    assert compiled._tiers is None and "map_tiers" in [p["name"] for p in report.passes]
    assert report.memory["transfers_bytes"] == 0 and set(report.memory["per_tier"]) == {"device", "host", "disk"}


def test_disk_tier_and_small_host(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    model, (x,) = stack(layers=4)
    wb = weight_bytes(model)
    tiers = ["device", {"name": "host", "capacity": wb // 3}, "disk"]
    compiled, report = compile_ahead(model, (x,), {"target": "cpu", "memory_budget": int(0.35 * wb), "tiers": tiers,
                                                   "cache_dir": str(tmp_path)})
    assert report.memory["per_tier"]["disk"] > wb // 3 and report.memory["per_tier"]["host"] <= wb // 3
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)[0], model(x))
        torch.testing.assert_close(compiled(x)[0], model(x))
    files = [f for _, _, fs in os.walk(tmp_path / "tiers") for f in fs]
    assert files, "disk-homed weights live in memory-mapped files"
    with pytest.raises(ValueError, match="host tier capacity .* add 'disk'"):
        compile_ahead(model, (x,), {"target": "cpu", "memory_budget": int(0.35 * wb), "tiers": tiers[:2]})


def test_torch_compile_parameters_as_inputs():
    """Under torch.compile the parameters are graph inputs: kiln plans them too (inference and
    the training forward, whose saved views of weights are re-made from the parameters)."""
    model, (x,) = stack(layers=4)
    budget = int(0.35 * weight_bytes(model))
    torch._dynamo.reset()
    f = kiln.compile(model, target="cpu", memory_budget=budget)
    with torch.no_grad():
        torch.testing.assert_close(f(x), model(x))
    mem = kiln.last_report().memory
    assert mem["transfers_bytes"] > 0.5 * weight_bytes(model) and mem["per_tier"]["device"] <= budget


def test_artifact_keeps_the_schedule(tmp_path):
    from kiln.runtime import load, save
    model, (x,) = stack(layers=4)
    budget = int(0.3 * weight_bytes(model))
    compiled, _ = compile_ahead(model, (x,), {"target": "cpu", "memory_budget": budget})
    save(compiled, str(tmp_path / "art"))
    loaded = load(str(tmp_path / "art"))
    assert loaded._tiers is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x))
    assert loaded._tiers.stats["max_device_bytes"] <= budget


@pytest.mark.parametrize("opts,match", [
    ({"memory_budget": -5}, "positive"), ({"memory_budget": "-1GiB"}, "positive"),
    ({"memory_budget": "lots"}, "cannot parse"), ({"memory_budget": "3 XB"}, "cannot parse"),
    ({"memory_budget": 0}, "positive"), ({"memory_budget": float("nan")}, "positive"),
    ({"tiers": ["device", "gpu"]}, "unknown tier 'gpu'"), ({"tiers": "device"}, "list of tier specs"),
    ({"tiers": [{"name": "host", "capacity": "-3GB"}]}, "positive"),
    ({"tiers": [{"name": "host", "bandwidth": "fast"}]}, "cannot parse"),
    ({"tiers": [{"name": "host", "speed": 1}]}, "keys name, capacity, bandwidth"),
    ({"tiers": ["host", "host"]}, "once"), ({"planner": "magic"}, "planner"),
    ({"memory_budget": 0.5}, "less than one byte"), ({"memory_budget": True}, "like '6GiB'"),
    ({"tiers": [{"name": "host", "bandwidth": -2}]}, r"bytes per second.*'25GB/s'"),
    ({"tiers": [7]}, "tier name or dict, e.g. 'host'")])
def test_bad_budgets_and_tier_specs(opts, match):
    with pytest.raises(ValueError, match=match) as e:
        kiln.Options.make(None, **opts)
    msg = str(e.value)
    assert "\n" not in msg and msg.split(":")[0] in ("memory_budget", "tiers", "planner") or msg.startswith("tiers[")
    if "positive" in msg or "cannot parse" in msg or "less than" in msg:
        assert "e.g." in msg                             # names what would work


def test_good_budgets_and_tier_specs():
    o = kiln.Options.make(memory_budget="1.5GiB", tiers=["device", {"name": "host", "capacity": "8GB",
                                                                     "bandwidth": "25GB/s"}, "disk"])
    assert o.memory_budget == int(1.5 * 2**30) and o.tiers[1].bandwidth == 25e9 and o.tiers[1].capacity == 8e9
    with pytest.raises(ValueError, match="cannot parse"):           # no exponents in strings
        kiln.Options.make(memory_budget="1e9")


def test_device_tier_capacity_names_itself_when_too_small():
    model, (x,) = stack(layers=2)
    with pytest.raises(ValueError, match=r"the device tier's capacity .* use memory_budget >= \d+"):
        compile_ahead(model, (x,), {"target": "cpu", "tiers": [{"name": "device", "capacity": 1024}, "host"]})
    with pytest.raises(ValueError, match=r"raise the host capacity to >= \d+"):
        compile_ahead(model, (x,), {"target": "cpu", "memory_budget": weight_bytes(model),
                                    "tiers": ["device", {"name": "host", "capacity": 1024}]})


def test_machine_defaults():
    t = {s.name: s for s in kiln.Options.make(tiers=["device", "host", "disk"]).resolved_tiers("cpu")}
    assert t["device"].capacity is None                 # unlimited on a CPU-only machine
    assert t["host"].capacity > 0 and t["disk"].capacity > 0
    assert all(s.bandwidth > 0 for s in t.values())


def test_cli_budget_errors_and_memory_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from kiln.cli import main
    spec = os.path.join(os.path.dirname(__file__), "specs.py") + ":small_stack"
    assert main(["explain", spec, "--target", "cpu", "--memory-budget=-3GB"]) == 1
    assert "memory_budget: must be a positive" in capsys.readouterr().err
    assert main(["explain", spec, "--target", "cpu", "--memory-budget", "1KiB"]) == 1
    assert "use memory_budget >=" in capsys.readouterr().err
    png = tmp_path / "plot.png"
    assert main(["explain", spec, "--target", "cpu", "--memory-budget", "40KiB", "--memory", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.stat().st_size > 1000 and "== tiers ==" in out and "planner greedy" in out
    assert main(["explain", spec, "--target", "cpu", "--memory", str(tmp_path / "none.png")]) == 1
    assert "--memory needs a tier plan" in capsys.readouterr().err

"""kiln.Options: the one options registry. Every option has a default, a description and a
validator; bad names or values raise ValueError naming the valid choices."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

TARGETS = ("auto", "triton", "cuda", "cpu")
QUANTIZE = (None, "int8", "int4", "bfp8", "auto")
PLANNERS = ("greedy", "ilp", "rl")
TIER_NAMES = ("device", "host", "disk")
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12,
          "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Any, what: str = "memory_budget", rate: bool = False) -> int:
    """'6GiB', '512MB', 1<<30 -> bytes (``rate``: bytes per second, '25GB/s' too). Rejects
    negative, zero, infinite or unparsable values with a one-line error naming what works."""
    example = "25000000000 or '25GB/s'" if rate else "6442450944 or '6GiB'"
    kind = "bytes per second" if rate else "bytes"
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected {kind} (a number) or a string like {example.split(' or ')[1]}, "
                         f"got {value!r}")
    if isinstance(value, (int, float)):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*" + (r"(?:/\s*s\s*)?" if rate else ""),
                         value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{what}: cannot parse {value!r}; use {kind}, e.g. {example} "
                             f"(units: {', '.join(u for u in _UNITS if u)})")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise ValueError(f"{what}: expected {kind} (a number) or a string like {example.split(' or ')[1]}, "
                         f"got {type(value).__name__}")
    if not n > 0 or n == float("inf"):
        raise ValueError(f"{what}: must be a positive, finite number of {kind}, got {value!r}; "
                         f"use e.g. {example}")
    if int(n) == 0:
        raise ValueError(f"{what}: {value!r} is less than one byte; use e.g. {example}")
    return int(n)


@dataclass(frozen=True)
class TierSpec:
    name: str
    capacity: int | None = None          # bytes; None = unlimited
    bandwidth: float | None = None       # bytes/s to/from the device tier

    @staticmethod
    def parse(spec: Any) -> "TierSpec":
        if isinstance(spec, TierSpec):
            t = spec
        elif isinstance(spec, str):
            t = TierSpec(spec)
        elif isinstance(spec, dict):
            unknown = set(spec) - {"name", "capacity", "bandwidth"}
            if unknown or "name" not in spec:
                raise ValueError(f"tiers: a tier spec is a dict with keys name, capacity, bandwidth; got {spec!r}")
            cap = spec.get("capacity")
            bw = spec.get("bandwidth")
            t = TierSpec(spec["name"], None if cap is None else parse_bytes(cap, f"tiers[{spec['name']}].capacity"),
                         None if bw is None else float(parse_bytes(bw, f"tiers[{spec['name']}].bandwidth", rate=True)))
        else:
            raise ValueError(f"tiers: expected a tier name or dict, e.g. 'host' or "
                             f"{{'name': 'host', 'capacity': '64GiB', 'bandwidth': '25GB/s'}}, got {spec!r}")
        if t.name not in TIER_NAMES:
            raise ValueError(f"tiers: unknown tier {t.name!r}; valid: {', '.join(TIER_NAMES)}")
        return t


# Default bandwidths to/from the device tier (bytes/s), where a tier spec gives none:
#   cuda: device 2 TB/s (HBM, for reference), host 25 GB/s (pinned copies over PCIe 4 x16;
#         PCIe 5 machines reach ~50: pass the measured figure, bench/offload.py does),
#         disk 2 GB/s (an NVMe read);
#   cpu:  device 20 GB/s, host 8 GB/s (a single-thread memcpy between the CPU tiers' arenas),
#         disk 1.5 GB/s.
TIER_BANDWIDTH = {"cuda": {"device": 2.0e12, "host": 25e9, "disk": 2e9},
                  "cpu": {"device": 20e9, "host": 8e9, "disk": 1.5e9}}


def machine_tier(t: TierSpec, device: str, cache_dir: str) -> TierSpec:
    """Fill a tier's missing capacity and bandwidth from the machine: device = free GPU memory
    (torch.cuda.mem_get_info; unlimited on the CPU), host = MemAvailable in /proc/meminfo,
    disk = free space under cache_dir (shutil.disk_usage); bandwidths from TIER_BANDWIDTH."""
    cap = t.capacity
    if cap is None:
        try:
            if t.name == "device" and device == "cuda":
                import torch
                cap = int(torch.cuda.mem_get_info()[0])
            elif t.name == "host":
                with open("/proc/meminfo") as f:
                    cap = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
            elif t.name == "disk":
                import shutil
                path = cache_dir if os.path.isdir(cache_dir) else os.path.dirname(os.path.abspath(cache_dir)) or "."
                cap = int(shutil.disk_usage(path).free)
        except (OSError, StopIteration, RuntimeError, ValueError):
            cap = None                      # unknown: unlimited
    bw = t.bandwidth if t.bandwidth is not None else TIER_BANDWIDTH.get(device, TIER_BANDWIDTH["cpu"])[t.name]
    return TierSpec(t.name, cap, bw)


def _default_cache_dir() -> str:
    return os.environ.get("KILN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kiln")


@dataclass(frozen=True)
class Options:
    target: str = "auto"
    memory_budget: int | None = None
    tiers: tuple = ("device", "host")
    quantize: str | None = None
    planner: str = "greedy"
    ilp_time_limit: float = 2.0     # seconds for each CP-SAT solve (planner="ilp"); greedy's plan on timeout
    autotune: Any = False
    cache_dir: str = field(default_factory=_default_cache_dir)
    report: str | None = None
    fusion: bool = True
    # replay graphs on the GPU as CUDA graphs (training graphs only without a memory budget): True,
    # False, or "auto" (when a timed warm-up call shows the graph launch-bound; runtime/cudagraphs.py
    # says how)
    cudagraphs: Any = "auto"
    debug: int = int(os.environ.get("KILN_DEBUG", "0") or 0)

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target: {self.target!r} is not valid; choose one of {', '.join(TARGETS)}")
        if self.memory_budget is not None:
            object.__setattr__(self, "memory_budget", parse_bytes(self.memory_budget))
        if isinstance(self.tiers, (str, dict)) or not hasattr(self.tiers, "__iter__"):
            raise ValueError("tiers: expected a list of tier specs, e.g. ['device', {'name': 'host', 'capacity': '64GiB'}]")
        tiers = tuple(TierSpec.parse(t) for t in self.tiers)
        names = [t.name for t in tiers]
        twice = sorted({x for x in names if names.count(x) > 1})
        if twice:
            raise ValueError(f"tiers: {', '.join(map(repr, twice))} given more than once; give each of "
                             f"{', '.join(TIER_NAMES)} at most once")
        object.__setattr__(self, "tiers", tiers)
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize: {self.quantize!r} is not valid; choose one of "
                             f"{', '.join(map(str, QUANTIZE))}")
        if self.planner not in PLANNERS:
            raise ValueError(f"planner: {self.planner!r} is not valid; choose one of {', '.join(PLANNERS)}")
        if isinstance(self.ilp_time_limit, bool) or not isinstance(self.ilp_time_limit, (int, float)) \
                or not self.ilp_time_limit > 0:
            raise ValueError(f"ilp_time_limit: expected a positive number of seconds, got {self.ilp_time_limit!r}")
        if not (isinstance(self.autotune, bool) or (isinstance(self.autotune, str) and
                                                     self.autotune.startswith(("http://", "https://")))):
            raise ValueError(f"autotune: expected False, True or a service URL (http://host:port), got {self.autotune!r}")
        if not isinstance(self.fusion, bool):
            raise ValueError(f"fusion: expected True or False, got {self.fusion!r}")
        if not (isinstance(self.cudagraphs, bool) or self.cudagraphs == "auto"):
            raise ValueError(f"cudagraphs: expected True, False or 'auto', got {self.cudagraphs!r}")
        if not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ValueError(f"cache_dir: expected a path, got {self.cache_dir!r}")
        if self.report is not None and not isinstance(self.report, (str, os.PathLike)):
            raise ValueError(f"report: expected a path to a JSON-lines file, got {self.report!r}")

    @classmethod
    def make(cls, options: "Options | dict | None" = None, **kw) -> "Options":
        """Build from a dict and/or keywords; unknown names raise ValueError listing the valid ones."""
        merged: dict = {}
        if isinstance(options, Options):
            merged = {f.name: getattr(options, f.name) for f in dataclasses.fields(cls)}
        elif options:
            merged = dict(options)
        merged.update(kw)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - names)
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))}; valid options: {', '.join(sorted(names))}")
        return cls(**merged)

    def resolved_target(self) -> str:
        if self.target != "auto":
            return self.target
        import torch
        return "triton" if torch.cuda.is_available() else "cpu"

    def resolved_tiers(self, device: str = "cpu") -> tuple:
        """The tiers with what the spec leaves out read from the machine (see machine_tier)."""
        return tuple(machine_tier(t, device, self.cache_dir) for t in self.tiers)

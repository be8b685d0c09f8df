"""CompileReport: what a compile did, in the shape DESIGN.md fixes (report keys are public)."""
from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field

_last: "CompileReport | None" = None
_lock = threading.Lock()


@dataclass
class CompileReport:
    graph_nodes: int = 0
    kernels: list = field(default_factory=list)          # {name, kind, target, ops}
    fallback_ops: list = field(default_factory=list)
    memory: dict = field(default_factory=lambda: {"peak_bytes": 0, "arena_bytes": 0,
                                                  "per_tier": {}, "transfers_bytes": 0})
    passes: list = field(default_factory=list)           # {name, ms}
    compile_s: float = 0.0
    graph_kind: str = "inference"                        # inference | forward | backward
    target: str = "cpu"
    cache_hits: int = 0
    tuning_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        generated = sum(1 for k in self.kernels if k["target"] != "aten")
        lines = [f"{self.graph_kind} graph: {self.graph_nodes} nodes -> {generated} generated kernels "
                 f"({self.target}), {len(self.fallback_ops)} fallback op kinds, compile {self.compile_s:.2f}s",
                 "passes: " + ", ".join(f"{p['name']} {p['ms']:.1f}ms" for p in self.passes),
                 f"memory: peak {self.memory['peak_bytes']:,} B, arena {self.memory['arena_bytes']:,} B"
                 + (" (no arena: tensors freed at their last use)" if self.memory.get("mode") == "dynamic" else "")]
        if self.fallback_ops:
            lines.append("fallbacks: " + ", ".join(self.fallback_ops))
        return "\n".join(lines)


def publish(report: CompileReport, path: str | None) -> None:
    """Record as the last report and append one JSON line to ``path`` if given."""
    global _last
    with _lock:
        _last = report
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(report.to_dict()) + "\n")


def last_report() -> CompileReport | None:
    return _last

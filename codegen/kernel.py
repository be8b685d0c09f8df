"""A generated kernel: its source, how to load it and how to launch it on tensors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Kernel:
    name: str
    kind: str                  # pointwise | reduction | matmul | attention | extern
    target: str                # triton | cuda | cpu | aten
    ops: list[str]
    source: str
    entry: str                 # function name inside source
    meta: dict = field(default_factory=dict)   # launch description (grid, block sizes, arg layout)
    launcher: Callable | None = field(default=None, repr=False, compare=False)

    def launch(self, inputs: list, outputs: list) -> list | None:
        """Writes ``outputs``; or returns tensors holding the results instead (a kernel that runs
        an ATen op with no out= form: attention_aten), which the caller binds in their place."""
        if self.launcher is None:
            from . import load_kernel
            load_kernel(self)
        return self.launcher(inputs, outputs)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "target": self.target, "ops": list(self.ops),
                "source": self.source, "entry": self.entry, "meta": self.meta}

    @staticmethod
    def from_dict(d: dict) -> "Kernel":
        return Kernel(d["name"], d["kind"], d["target"], list(d["ops"]), d["source"], d["entry"], dict(d["meta"]))

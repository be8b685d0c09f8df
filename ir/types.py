"""Tensor types carried by every IR value: shape, dtype, strides, device (+ later tier/quant)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
    torch.float8_e4m3fn, torch.float8_e5m2)}


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(sorted(_DTYPES))}") from None


def contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class TensorType:
    """Static type of a tensor value. Shapes are concrete: dynamic shapes recompile."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    strides: tuple[int, ...]
    device: str = "cpu"
    offset: int = 0
    annotations: dict = field(default_factory=dict, compare=False, hash=False)

    @staticmethod
    def of(t: torch.Tensor) -> "TensorType":
        dev = t.device.type if t.device.type != "meta" else "cpu"
        return TensorType(tuple(int(s) for s in t.shape), t.dtype, tuple(int(s) for s in t.stride()),
                          dev, int(t.storage_offset()))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def storage_bytes(self) -> int:
        """Bytes the underlying storage must span for this (possibly strided) view."""
        if self.numel == 0:
            return 0
        extent = self.offset + 1 + sum((s - 1) * st for s, st in zip(self.shape, self.strides))
        return extent * self.itemsize

    @property
    def is_contiguous(self) -> bool:
        return all(st == c for s, st, c in zip(self.shape, self.strides, contiguous_strides(self.shape)) if s > 1)

    def meta(self) -> torch.Tensor:
        """An empty meta tensor with exactly this layout, for shape/stride inference."""
        base = torch.empty_strided(self.shape, self.strides, dtype=self.dtype, device="meta")
        if self.offset:
            base = base.as_strided(self.shape, self.strides, self.offset)
        return base

    def with_(self, **kw) -> "TensorType":
        d = dict(shape=self.shape, dtype=self.dtype, strides=self.strides, device=self.device,
                 offset=self.offset, annotations=dict(self.annotations))
        d.update(kw)
        return TensorType(**d)

    def __str__(self) -> str:
        s = f"{dtype_name(self.dtype)}[{','.join(map(str, self.shape))}]"
        if tuple(self.strides) != contiguous_strides(self.shape) or self.offset:   # exact: parse_type reads it back
            s += f"{{{','.join(map(str, self.strides))}" + (f"+{self.offset}" if self.offset else "") + "}"
        if self.device != "cpu":
            s += f"@{self.device}"
        return s

"""Shared fixtures of the matmul tests."""
import pytest


@pytest.fixture
def descriptors(monkeypatch):
    """The TMA tensor descriptors the matmul launcher makes, in order (counted as they are built)."""
    from triton.tools import tensor_descriptor
    made = []

    class Counted(tensor_descriptor.TensorDescriptor):
        def __post_init__(self):
            super().__post_init__()
            made.append(self)
    monkeypatch.setattr(tensor_descriptor, "TensorDescriptor", Counted)
    return made

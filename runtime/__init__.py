"""kiln.runtime: executes compiled graphs; artifacts on disk."""
from .executor import CompiledGraph, InputError

__all__ = ["CompiledGraph", "InputError"]

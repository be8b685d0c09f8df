"""kiln.runtime: executes compiled graphs; artifacts on disk."""
from .artifact import ArtifactError, load, save
from .executor import CompiledGraph, InputError

__all__ = ["CompiledGraph", "InputError", "ArtifactError", "save", "load"]

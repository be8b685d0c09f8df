"""kiln.passes: graph -> graph transformations and analyses."""
from .pipeline import PIPELINE, run_pipeline

__all__ = ["PIPELINE", "run_pipeline"]

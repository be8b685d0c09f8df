"""kiln.codegen: fused groups -> kernel sources (Triton, CUDA C, numba) via jinja2 templates."""
from .kernel import Kernel


def generate(graph, target: str, cache_dir: str) -> dict:
    """One Kernel per kiln.fused node, keyed by the node's first output name."""
    from .lower import generate_all
    return generate_all(graph, target, cache_dir)


def load_kernel(kernel: Kernel) -> None:
    from .loader import load
    load(kernel)


__all__ = ["Kernel", "generate", "load_kernel"]

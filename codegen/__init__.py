"""kiln.codegen: fused groups -> kernel sources (Triton, CUDA C, numba) via jinja2 templates."""
from .kernel import Kernel


def generate(graph, target: str, cache_dir: str, autotune: bool = False) -> dict:
    """One Kernel per kiln.fused node, keyed by the node's first output name. With ``autotune``
    a GPU kernel times its candidate launch configs on first launch (and remembers the winner)."""
    from .lower import generate_all
    return generate_all(graph, target, cache_dir, autotune)


def load_kernel(kernel: Kernel) -> None:
    from .loader import load
    load(kernel)


__all__ = ["Kernel", "generate", "load_kernel"]

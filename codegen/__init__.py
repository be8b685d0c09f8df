"""kiln.codegen: fused groups -> kernel sources (Triton, CUDA C, numba) via jinja2 templates."""
from .kernel import Kernel


def generate(graph, target: str, cache_dir: str, autotune: bool = False) -> dict:
    """One Kernel per kiln.fused node, keyed by the node's first output name. With ``autotune``
    a GPU kernel times its candidate launch configs on first launch (and remembers the winner)."""
    from kiln.ir.ops import is_kernel_op
    from .registry import builder_for
    return {n.outputs[0].name: builder_for(n.op)(n, target, cache_dir, autotune)
            for n in graph.nodes if is_kernel_op(n.op)}


def load_kernel(kernel: Kernel) -> None:
    from .registry import loader_for
    loader_for(kernel.meta.get("launcher", "loop"))(kernel)


__all__ = ["Kernel", "generate", "load_kernel"]

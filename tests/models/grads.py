"""Training-gradient checks against eager PyTorch: the parameters' gradients after one step of
each, compared by relative norm per parameter."""
import torch


def step_grads(model: torch.nn.Module, step) -> dict[str, torch.Tensor]:
    """Each parameter's gradient after ``step()`` (a forward and backward), from cleared grads."""
    model.zero_grad(set_to_none=True)
    step()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, want: dict, tol: float = 1e-4) -> None:
    errors = {n: ((got[n] - g).norm() / g.norm()).item() for n, g in want.items()}
    assert max(errors.values()) < tol, sorted(errors.items(), key=lambda kv: -kv[1])[:4]

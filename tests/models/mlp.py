"""A pre-norm residual MLP (layer norm, linear, GELU, residual add per layer) shared by the memory
tests: the CPU executor-frees test at small sizes and the GPU peak-memory test at 1024 wide."""
import torch


class ResidualMLP(torch.nn.Module):
    def __init__(self, d: int, layers: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, x):
        for lin in self.layers:
            x = x + torch.nn.functional.gelu(lin(self.norm(x)))
        return x

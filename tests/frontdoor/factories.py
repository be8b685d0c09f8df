"""Model factories for the front-door tests and CLI specs (``tests/frontdoor/factories.py:make``)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallNet(nn.Module):
    """Linear -> layernorm -> GELU -> linear, plus a residual and a second output (a reduction)."""
    def __init__(self, d_in=16, d=32, d_out=8):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d)
        self.ln = nn.LayerNorm(d)
        self.fc2 = nn.Linear(d, d_out)
        self.skip = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x, scale):
        h = F.gelu(self.ln(self.fc1(x)))
        y = self.fc2(h) * scale + self.skip(x)
        return y, torch.softmax(y, dim=-1).sum(dim=0)


def make():
    torch.manual_seed(0)
    return SmallNet().eval(), (torch.randn(4, 16), torch.rand(4, 1) + 0.5)


def make_three():
    m, inputs = make()
    return m, inputs, "extra"


def make_raises():
    raise RuntimeError("factory exploded")


not_callable = 42


class Counter(nn.Module):
    """Counts its calls in a buffer: state an artifact cannot carry from call to call."""
    def __init__(self):
        super().__init__()
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        self.n += 1
        return x * self.n


def make_counter():
    return Counter(), (torch.randn(3),)


class AddsToInput(nn.Module):
    def forward(self, x):
        x.add_(1)
        return x * 2


def make_adds_to_input():
    return AddsToInput(), (torch.randn(3),)

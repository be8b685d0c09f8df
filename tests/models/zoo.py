"""A small model zoo for end-to-end correctness: each entry builds (model, example inputs) at
shapes small enough for the Triton interpreter (batch 2, seq 8, hidden 32)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

B, S, H, HEADS, VOCAB = 2, 8, 32, 4, 64


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(H, 2 * H), nn.Linear(2 * H, H), nn.Linear(H, 8)

    def forward(self, x):
        return self.l3(F.gelu(self.l2(torch.relu(self.l1(x)))) + x)


class CNN(nn.Module):
    """conv (an ATen fallback) + batchnorm + relu + max/avg pooling + linear head."""
    def __init__(self):
        super().__init__()
        # no conv bias: batchnorm cancels it (its gradient is zero up to rounding)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Block(nn.Module):
    """Pre-norm transformer block: layernorm, causal attention through matmul + masked_fill +
    softmax, GELU MLP, residuals."""
    def __init__(self, d=H, heads=HEADS):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.register_buffer("causal", torch.triu(torch.ones(S, S, dtype=torch.bool), 1), persistent=False)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        att = att.masked_fill(self.causal[:s, :s], float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Embed(nn.Module):
    """Token + position embeddings, layernorm, a tied output projection and a softmax."""
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, H), nn.Embedding(S, H)
        self.ln = nn.LayerNorm(H)

    def forward(self, ids):
        h = self.ln(self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device)))
        return torch.softmax(h @ self.tok.weight.t(), dim=-1)


# A custom op with a fake (meta) implementation: kiln cannot see inside it, so it must run as an
# ATen fallback and be listed in the report's fallback_ops.
# This module must load once per process, as ``models.zoo`` (the name pytest gives it): a second
# copy (``tests.models.zoo``) defines the op again, and torch then destroys the first definition
# under whatever still holds it (a full-suite worker once failed two custom-op tests with
# std::bad_alloc from a fake-tensor call after that).
_first = getattr(torch._library.custom_ops, "OPDEFS", {}).get("kiln_zoo::scaled_tanh")
if _first is not None and getattr(_first._init_fn, "__module__", __name__) != __name__:
    raise ImportError(f"tests/models/zoo.py is loaded twice ({_first._init_fn.__module__} and {__name__}); "
                      "import it as models.zoo")


@torch.library.custom_op("kiln_zoo::scaled_tanh", mutates_args=())
def scaled_tanh(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.tanh(x) * scale


@scaled_tanh.register_fake
def _(x, scale):
    return torch.empty_like(x)


def _scaled_tanh_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * ctx.scale * (1 - torch.tanh(x) ** 2), None


def _scaled_tanh_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.scale = inputs[1]


scaled_tanh.register_autograd(_scaled_tanh_backward, setup_context=_scaled_tanh_setup)
CUSTOM_OP = "kiln_zoo.scaled_tanh.default"


class CustomOpModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(H, H), nn.Linear(H, 8)

    def forward(self, x):
        return self.l2(scaled_tanh(self.l1(x), 2.0) + x).sigmoid()


def _ids():
    return torch.randint(0, VOCAB, (B, S))


# name -> (factory, example-input factory, has float inputs that take gradients)
ZOO = {
    "mlp": (MLP, lambda: (torch.randn(B, S, H),)),
    "cnn": (CNN, lambda: (torch.randn(B, 3, 8, 8),)),
    "block": (Block, lambda: (torch.randn(B, S, H),)),
    "embed": (Embed, lambda: (_ids(),)),
    "custom_op": (CustomOpModel, lambda: (torch.randn(B, S, H),)),
}


def build(name: str, seed: int = 0, device: str = "cpu"):
    torch.manual_seed(seed)
    factory, inputs = ZOO[name]
    return factory().to(device), tuple(x.to(device) for x in inputs())


def device_for(target: str) -> str:
    """Where a target's tensors live: Triton kernels need a GPU's memory when there is a GPU
    (without one they run in the interpreter on host tensors)."""
    return "cuda" if target == "triton" and torch.cuda.is_available() else "cpu"

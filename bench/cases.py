"""Benchmark cases as small factories: ``make(device, small) -> (fn_or_module, inputs)``.

Micro cases reuse bench/gpu_fusion.py's functions. Model cases are transformers modules with
random weights at the issue's sizes (``small=False``) or at tiny sizes for the CPU mode
(``small=True``). All run under ``torch.no_grad()`` in eval mode.
"""
from __future__ import annotations

import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_fusion as gf  # noqa: E402

BF16, F32 = torch.bfloat16, torch.float32


def _dt(small: bool) -> torch.dtype:
    return F32 if small else BF16


def _randn(*shape, dev, small):
    return torch.randn(*shape, device=dev, dtype=_dt(small))


# ---- micro cases --------------------------------------------------------------------------------
def bias_gelu_residual(dev, small):
    M, N = (64, 256) if small else (16384, 4096)
    return gf.bias_gelu_residual, (_randn(M, N, dev=dev, small=small), _randn(N, dev=dev, small=small),
                                   _randn(M, N, dev=dev, small=small))


def add_rmsnorm(dev, small):
    M, N = (64, 256) if small else (16384, 4096)
    w = torch.rand(N, device=dev, dtype=_dt(small)) + 0.5
    return gf.add_rmsnorm, (_randn(M, N, dev=dev, small=small), _randn(M, N, dev=dev, small=small), w)


def softmax(dev, small):
    M, N = (64, 512) if small else (4096, 8192)
    return gf.softmax, (_randn(M, N, dev=dev, small=small),)


def layernorm(dev, small):
    M, N = (64, 256) if small else (16384, 4096)
    return gf.layernorm, (_randn(M, N, dev=dev, small=small), _randn(N, dev=dev, small=small),
                          _randn(N, dev=dev, small=small))


# ---- model cases (transformers) -----------------------------------------------------------------
def _llama_config(small: bool):
    from transformers import LlamaConfig
    if small:
        kw = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2)
    else:       # TinyLlama-1.1B's layer: hidden 2048, GQA 32 query / 4 key-value heads
        kw = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4)
    cfg = LlamaConfig(num_hidden_layers=1, max_position_embeddings=4096, **kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _cache_kwarg(layer) -> str:
    return "past_key_values" if "past_key_values" in inspect.signature(layer.forward).parameters else "past_key_value"


class LlamaLayer(torch.nn.Module):
    """A Llama decoder layer with its rotary embedding (computed in the graph), causal attention."""
    def __init__(self, cfg):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
        self.layer, self.rope = LlamaDecoderLayer(cfg, layer_idx=0), LlamaRotaryEmbedding(cfg)

    def forward(self, h):
        pos = torch.arange(h.shape[1], device=h.device)[None].expand(h.shape[0], -1)
        return _first(self.layer(h, attention_mask=None, position_ids=pos, position_embeddings=self.rope(h, pos)))


class LlamaDecode(torch.nn.Module):
    """One decode step: one new token per sequence attends to a KV cache of ``k_cache.shape[2]``
    past tokens (a transformers DynamicCache built in the step, so every call sees the same cache)."""
    def __init__(self, cfg):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
        self.layer, self.rope = LlamaDecoderLayer(cfg, layer_idx=0), LlamaRotaryEmbedding(cfg)
        self.cache_kw = _cache_kwarg(self.layer)

    def forward(self, h, k_cache, v_cache):
        from transformers import DynamicCache
        past = k_cache.shape[2]
        pos = torch.full((h.shape[0], 1), past, device=h.device, dtype=torch.long)
        cache = DynamicCache()
        cache.update(k_cache, v_cache, 0)
        out = self.layer(h, attention_mask=None, position_ids=pos, use_cache=True,
                         cache_position=torch.arange(past, past + 1, device=h.device),
                         position_embeddings=self.rope(h, pos), **{self.cache_kw: cache})
        return _first(out)


def _module(m: torch.nn.Module, dev, small):
    return m.to(device=dev, dtype=_dt(small)).eval()


def llama_layer(dev, small):
    cfg = _llama_config(small)
    B, S = (2, 32) if small else (8, 1024)
    return _module(LlamaLayer(cfg), dev, small), (_randn(B, S, cfg.hidden_size, dev=dev, small=small),)


def llama_decode(dev, small):
    cfg = _llama_config(small)
    B, past = (2, 64) if small else (8, 2048)
    hd = cfg.hidden_size // cfg.num_attention_heads
    kv = lambda: _randn(B, cfg.num_key_value_heads, past, hd, dev=dev, small=small)  # noqa: E731
    return _module(LlamaDecode(cfg), dev, small), (_randn(B, 1, cfg.hidden_size, dev=dev, small=small), kv(), kv())


class _First(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, h):
        return _first(self.m(h))


def gpt2_block(dev, small):
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    E, H, B, S = (64, 4, 2, 32) if small else (1024, 16, 8, 1024)      # GPT-2 medium's block
    cfg = GPT2Config(n_embd=E, n_head=H, n_layer=1, n_positions=max(S, 1024), resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "sdpa"
    return _module(_First(GPT2Block(cfg, layer_idx=0)), dev, small), (_randn(B, S, E, dev=dev, small=small),)


def bert_layer(dev, small):
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer
    E, H, I, B, S = (64, 4, 256, 2, 32) if small else (1024, 16, 4096, 8, 512)   # BERT-large's layer
    cfg = BertConfig(hidden_size=E, num_attention_heads=H, intermediate_size=I, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "sdpa"
    return _module(_First(BertLayer(cfg)), dev, small), (_randn(B, S, E, dev=dev, small=small),)


def swiglu_mlp(dev, small):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    T, E, I = (128, 64, 176) if small else (8192, 4096, 11008)
    cfg = LlamaConfig(hidden_size=E, intermediate_size=I, num_hidden_layers=1)
    return _module(LlamaMLP(cfg), dev, small), (_randn(T, E, dev=dev, small=small),)


# name -> (group, factory, description at full size)
CASES = {
    "bias_gelu_residual": ("micro", bias_gelu_residual, "bias+GELU+residual 16384x4096"),
    "add_rmsnorm": ("micro", add_rmsnorm, "add+RMSNorm 16384x4096"),
    "softmax": ("micro", softmax, "softmax 4096x8192"),
    "layernorm": ("micro", layernorm, "layernorm 16384x4096"),
    "llama_layer": ("model", llama_layer, "Llama decoder layer, hidden 2048, B8 S1024"),
    "gpt2_block": ("model", gpt2_block, "GPT-2 medium block, hidden 1024, B8 S1024"),
    "bert_layer": ("model", bert_layer, "BERT-large layer, hidden 1024, B8 S512"),
    "swiglu_mlp": ("model", swiglu_mlp, "SwiGLU MLP 8192x4096 -> 11008"),
    "llama_decode": ("model", llama_decode, "Llama decode step, 1 token, KV cache 2048, B8"),
}
GROUPS = {"micro": [n for n, c in CASES.items() if c[0] == "micro"],
          "model": [n for n, c in CASES.items() if c[0] == "model"],
          "all": list(CASES),
          "tiny": ["softmax", "bias_gelu_residual"]}


def resolve(names: list[str] | None, default: str) -> list[str]:
    """Case names and group names (micro, model, all, tiny) -> case names, in order, once each."""
    out = []
    for n in names or [default]:
        for part in n.split(","):
            part = part.strip()
            if not part:
                continue
            if part in GROUPS:
                out += GROUPS[part]
            elif part in CASES:
                out.append(part)
            else:
                raise ValueError(f"unknown bench case {part!r}; cases: {', '.join(CASES)}; "
                                 f"groups: {', '.join(GROUPS)}")
    if not out:
        raise ValueError(f"no bench cases named; cases: {', '.join(CASES)}; groups: {', '.join(GROUPS)}")
    return list(dict.fromkeys(out))

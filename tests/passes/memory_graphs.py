"""Captured kiln graphs for the memory-planning tests and bench: the model zoo and small
random-config Hugging Face models (GPT-2, Llama, BERT), inference and a training step."""
from __future__ import annotations

import os
import sys

import torch

from kiln.ir import Graph
from kiln.ir.capture import dynamo_backend, from_fx

B, S, VOCAB = 2, 8, 128


def capture(model, inputs, train: bool = False, kwargs: dict | None = None) -> list[tuple[str, Graph]]:
    """(kind, graph) for every graph Dynamo/AOTAutograd hands kiln: inference, or forward and
    backward of one training step (loss = sum of the first output)."""
    graphs: list[tuple[str, Graph]] = []

    def keep(gm, example_inputs, kind):
        graphs.append((kind, from_fx(gm)))
        return gm.forward

    torch._dynamo.reset()
    model.train(train)
    compiled = torch.compile(model, backend=dynamo_backend(keep), dynamic=False)
    kwargs = kwargs or {}
    if train:
        xs = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = compiled(*xs, **kwargs)
        out = out if isinstance(out, torch.Tensor) else out[0]
        out.float().sum().backward()
    else:
        with torch.no_grad():
            compiled(*inputs, **kwargs)
    return graphs


def zoo():
    """(ZOO, build) from tests/models/zoo.py, imported as ``models.zoo`` as pytest imports it
    (a second copy would register its custom op twice)."""
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    from models.zoo import ZOO, build
    return ZOO, build


def transformers_models() -> dict:
    """name -> (model factory, kwargs factory); empty without the transformers package."""
    try:
        import transformers
    except ImportError:
        return {}
    transformers.logging.set_verbosity_error()
    ids = lambda: {"input_ids": torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(0))}  # noqa: E731
    return {
        "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)), ids),
        "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64)), ids),
        "bert": (lambda: transformers.BertForMaskedLM(transformers.BertConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            vocab_size=VOCAB, max_position_embeddings=64)), ids),
    }


def model_graphs(name: str, train: bool) -> list[tuple[str, Graph]]:
    """Graphs of a zoo model or a transformers model by name."""
    ZOO, build = zoo()
    torch.manual_seed(0)
    if name in ZOO:
        model, inputs = build(name)
        return capture(model, inputs, train)
    make, kw = transformers_models()[name]
    model = make()
    if train:
        return capture(_Logits(model), (), True, kw())
    return capture(model, (), False, kw())


class _Logits(torch.nn.Module):
    """A transformers model whose output is its logits tensor (for the training step's loss)."""
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, **kw):
        return self.m(**kw).logits

"""Hugging Face models from small random configs (nothing downloaded) compile with kiln, match
eager logits, and most of their IR ops run in kernels kiln generated.

The ratio is computed from the compile reports: ops listed by generated kernels (target != aten;
view ops inside kernels left out) over that plus the number of ATen entries (matmuls, gathers,
other fallbacks; unfused views are not entries)."""
from __future__ import annotations

import json

import pytest
import torch

import kiln
from kiln.ir import OpKind, op_kind

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

B, S, VOCAB = 2, 8, 128


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0))


def _bert():
    return transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=64))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64))


def _t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=VOCAB,
        decoder_start_token_id=0))


def _vit():
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=16, patch_size=4, num_labels=10))


def _bloom():        # ALiBi position biases in the attention scores
    return transformers.BloomForCausalLM(transformers.BloomConfig(
        hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB))


def _gptj():         # rotary embedding on part of each head, interleaved pairs
    return transformers.GPTJForCausalLM(transformers.GPTJConfig(
        n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=VOCAB, n_positions=64))


def _falcon():       # parallel attention and MLP, grouped KV heads
    return transformers.FalconForCausalLM(transformers.FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
        num_kv_heads=2, vocab_size=VOCAB))


def _distilbert():   # with a padding mask
    return transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
        dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=VOCAB, max_position_embeddings=64))


def _ids(seed=0):
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


INPUTS = {"gpt2": lambda: dict(input_ids=_ids()), "bert": lambda: dict(input_ids=_ids()),
          "llama": lambda: dict(input_ids=_ids()),
          "t5": lambda: dict(input_ids=_ids(), decoder_input_ids=_ids(1)[:, :4]),
          "vit": lambda: dict(pixel_values=torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(0))),
          "bloom": lambda: dict(input_ids=_ids()), "gptj": lambda: dict(input_ids=_ids()),
          "falcon": lambda: dict(input_ids=_ids()),
          "distilbert": lambda: dict(input_ids=_ids(), attention_mask=(torch.arange(S) < torch.tensor([[S], [S - 3]])).long())}
MODELS = {"gpt2": _gpt2, "bert": _bert, "llama": _llama, "t5": _t5, "vit": _vit, "bloom": _bloom, "gptj": _gptj,
          "falcon": _falcon, "distilbert": _distilbert}
def generated_ratio(reports: list[dict]) -> tuple[float, int, int]:
    gen = sum(1 for r in reports for k in r["kernels"] if k["target"] != "aten"
              for o in k["ops"] if op_kind(o) != OpKind.VIEW)
    aten = sum(1 for r in reports for k in r["kernels"] if k["target"] == "aten")
    return gen / max(gen + aten, 1), gen, aten


def _run(name, target, tmp_path):
    torch._dynamo.reset()
    torch.manual_seed(0)
    dev = "cuda" if target == "triton" and torch.cuda.is_available() else "cpu"
    model = MODELS[name]().eval().to(dev)
    inputs = {k: v.to(dev) for k, v in INPUTS[name]().items()}
    rep = tmp_path / "report.jsonl"
    compiled = torch.compile(model, backend="kiln", options={"target": target, "report": str(rep)})
    with torch.no_grad():
        want = model(**inputs).logits
        got = compiled(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with open(rep) as f:
        reports = [json.loads(line) for line in f]
    assert reports and all(r["graph_kind"] == "inference" for r in reports)
    return reports


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_model_cpu(name, tmp_path, record_property):
    reports = _run(name, "cpu", tmp_path)
    ratio, gen, aten = generated_ratio(reports)
    fallbacks = sorted({op for r in reports for op in r["fallback_ops"]})
    record_property("generated_op_ratio", round(ratio, 4))
    print(f"{name}: generated-op ratio {ratio:.3f} ({gen} ops in kernels, {aten} ATen entries); "
          f"fallbacks {fallbacks}")
    assert ratio >= 0.8, (ratio, fallbacks)


@pytest.mark.parametrize("name", ["gpt2"])
def test_hf_model_triton(name, tmp_path):
    reports = _run(name, "triton", tmp_path)
    assert generated_ratio(reports)[0] >= 0.8


def _small(config_cls, **kw):
    return config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)


@pytest.mark.parametrize("name, attention_kernels", [("mistral_sliding_window", 2), ("gemma2_softcap", 0)])
@pytest.mark.parametrize("target", ["cpu", "triton"])
def test_attention_look_alikes(name, attention_kernels, target):
    """Attention that is not the plain pattern: Mistral's sliding window (a band mask, not a causal
    one) runs as kiln attention with its mask; Gemma 2's soft-capped scores (tanh(s / c) * c before
    the softmax) are no pattern kiln fuses, and must not be taken for one. Both match eager."""
    if name == "mistral_sliding_window":
        cfg = _small(transformers.MistralConfig, sliding_window=4)
    else:
        cfg = _small(transformers.Gemma2Config, head_dim=16, attn_logit_softcapping=5.0,
                     final_logit_softcapping=3.0, sliding_window=4, query_pre_attn_scalar=16)
    torch.manual_seed(0)
    dev = "cuda" if target == "triton" and torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval().to(dev)
    ids = torch.randint(0, VOCAB, (B, 12), generator=torch.Generator().manual_seed(0)).to(dev)
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(ids).logits
        got = kiln.compile(model, target=target)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert sum(k["kind"] == "attention" for k in kiln.last_report().kernels) == attention_kernels

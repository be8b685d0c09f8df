"""Real models' attention gets fused: Hugging Face GPT-2, Llama (GQA, rotary) and BERT from small
random configs, with the library's eager attention (explicit matmul/softmax and its own masks)
and its SDPA attention, with and without a padding mask, inference and training. Every layer's
attention must run as one attention kernel (forward, and backward when training) and logits and
gradients must match eager."""
from __future__ import annotations

import json

import pytest
import torch

import kiln

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V, LAYERS = 128, 2


def _model(name, impl):
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=LAYERS, n_embd=64, n_head=4, vocab_size=V, n_positions=64,
                                      attn_implementation=impl)
        return transformers.GPT2LMHeadModel(cfg)
    if name == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128, vocab_size=V,
                                       max_position_embeddings=64, attn_implementation=impl)
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=V, max_position_embeddings=64,
                                  attn_implementation=impl)
    return transformers.BertForMaskedLM(cfg)


CASES = [("gpt2", "eager", "triton", True, False), ("gpt2", "sdpa", "cpu", False, False),
         ("llama", "sdpa", "cpu", True, True), ("llama", "eager", "cpu", False, True),
         ("bert", "sdpa", "cpu", False, True), ("bert", "eager", "cpu", True, False)]


@pytest.mark.parametrize("name,impl,target,train,pad", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{'train' if c[3] else 'infer'}{'-pad' if c[4] else ''}"
                              for c in CASES])
def test_model_attention_fused(name, impl, target, train, pad, tmp_path):
    torch.manual_seed(0)
    model = _model(name, impl)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    model.train(train)
    kw = {"input_ids": torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))}
    if pad:
        kw["attention_mask"] = torch.ones(2, 12, dtype=torch.long)
        kw["attention_mask"][1, :3] = 0
    report = tmp_path / "r.jsonl"
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="kiln", options={"target": target, "report": str(report)})
    with torch.set_grad_enabled(train):
        got = compiled(**kw).logits
        if train:
            got.square().mean().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad()
        want = model(**kw).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if train:
        want.square().mean().backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-6, msg=n)
    reports = [json.loads(line) for line in report.read_text().splitlines()]
    kinds = {r["graph_kind"]: [k["target"] for k in r["kernels"] if k["kind"] == "attention"] for r in reports}
    want_kinds = {"forward": [target] * LAYERS, "backward": [target] * LAYERS} if train else \
        {"inference": [target] * LAYERS}
    assert kinds == want_kinds


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_bf16_layer_sdpa_fused(name):
    """One bf16 layer (the benchmark suite's model cases, small): on the CPU PyTorch runs bf16
    SDPA as fp32 math on cast copies of Q/K/V, sliced out of the fused QKV projection with
    as_strided; attention must still become one kernel, and compiling must not trip over
    AOTAutograd's FakeTensorMode when it evaluates the causal mask."""
    from transformers.models.bert.modeling_bert import BertLayer
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_embd=128, n_head=2, n_layer=1, n_positions=64, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
        layer = GPT2Block(cfg, layer_idx=0)
    else:
        cfg = transformers.BertConfig(hidden_size=128, num_attention_heads=2, intermediate_size=256,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                      attn_implementation="sdpa")
        layer = BertLayer(cfg)
    layer = layer.to(torch.bfloat16).eval()
    x = torch.randn(2, 32, 128, dtype=torch.bfloat16)

    def fn(h):
        out = layer(h)
        return out[0] if isinstance(out, tuple) else out
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(fn, backend="kiln", options={"target": "triton"})(x)
        want = fn(x)
    assert [k["kind"] for k in kiln.last_report().kernels].count("attention") == 1
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)


def _more(name):
    t = transformers
    if name == "bart":      # encoder, decoder self-attention and cross-attention
        return t.BartForConditionalGeneration(t.BartConfig(
            vocab_size=V, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=LAYERS,
            decoder_layers=LAYERS, encoder_attention_heads=4, decoder_attention_heads=4, max_position_embeddings=64,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0))
    if name == "opt":
        cfg = t.OPTConfig(vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                          max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0,
                          activation_dropout=0.0)
    elif name == "qwen2":
        cfg = t.Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    else:
        cfg = t.Phi3Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return t.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("name,attention", [("qwen2", 2), ("phi3", 2), ("opt", 2), ("bart", 6)])
def test_more_architectures_train_step(name, attention, tmp_path):
    """Qwen2 (GQA, q/k/v biases), Phi-3 (fused qkv and gate/up projections), OPT (learned positions
    from a cumsum) and BART (encoder-decoder with cross-attention): a training step on the cpu target
    matches eager's logits and gradients, with every attention one kernel, forward and backward.
    Gradients compare against the largest one: a key bias's is zero in exact arithmetic (softmax is
    shift-invariant per row) and rounding noise in both."""
    torch.manual_seed(0)
    model = _more(name).train()
    kw = {"input_ids": torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))}
    if name == "bart":
        kw["decoder_input_ids"] = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(1))
    report = tmp_path / "r.jsonl"
    torch._dynamo.reset()
    got = torch.compile(model, backend="kiln", options={"target": "cpu", "report": str(report)})(**kw).logits
    got.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = model(**kw).logits
    want.square().mean().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-5 * scale, msg=n)
    reports = [json.loads(line) for line in report.read_text().splitlines()]
    kinds = {r["graph_kind"]: sum(k["kind"] == "attention" for k in r["kernels"]) for r in reports}
    assert kinds == {"forward": attention, "backward": attention}

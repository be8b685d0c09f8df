"""Small GPT-2 and Llama configs compile on target triton with their linear layers as kiln.matmul
kernels (epilogues, Q/K/V and gate/up fused horizontally) and match eager logits."""
import pytest
import torch

import kiln

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
VOCAB = 128


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0))


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64))


def run(model, batch, seq):
    torch.manual_seed(0)
    m = model().eval()
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        got = kiln.compile(m, target="triton")(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    return [k for k in kiln.last_report().kernels if k["kind"] == "matmul" and k["target"] == "triton"]


@pytest.mark.parametrize("batch,seq", [(2, 16), (2, 1)])
def test_gpt2(batch, seq):
    mms = run(gpt2, batch, seq)
    fused = [k for k in mms if "aten.add.Tensor" in k["ops"]]
    assert len(fused) >= 3, mms                     # c_attn, attn c_proj, mlp c_fc (+gelu), mlp c_proj
    assert any("aten.tanh.default" in k["ops"] for k in mms)


@pytest.mark.parametrize("batch,seq", [(2, 16), (2, 1)])
def test_llama(batch, seq):
    mms = run(llama, batch, seq)
    names = [k["name"] for k in mms]
    assert any("mm_mm_mm" in n for n in names), names          # q, k, v: one launch
    swiglu = [k for k in mms if "aten.sigmoid.default" in k["ops"]]
    assert swiglu and "mm_mm" in swiglu[0]["name"]              # gate/up with silu(gate) * up fused

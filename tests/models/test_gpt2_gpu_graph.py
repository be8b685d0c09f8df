"""GPT-2's training step captured as on a GPU: there SDPA in float32 dispatches to the
memory-efficient attention op, whose backward AOTAutograd pairs with as_strided_scatter over a
zero buffer to assemble the fused Q/K/V gradient. kiln generates that buffer as a kernel in the
arena, and ATen's as_strided_scatter counted its offset from the arena's start: the c_attn and
ln_1 gradients came out zero (relative error 1.0) whenever the arena plan ran, on the H200 and
here. The CPU cannot run that attention op eagerly, so eager's reference is plain SDPA."""
import functools

import pytest
import torch

from models.grads import assert_grads_close, step_grads

transformers = pytest.importorskip("transformers")


def _efficient(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    assert attn_mask is None and dropout_p == 0.0
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, is_causal,
                                                                  scale=scale)[0]


@pytest.mark.parametrize("target", ["cpu"])
def test_gpt2_train_grads_with_the_gpu_attention_op(target, monkeypatch):
    from kiln.api import kiln_backend
    import transformers.integrations.sdpa_attention as sdpa_attention
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=128, n_head=8, vocab_size=512, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=functools.partial(kiln_backend, options={"target": target}))
    with monkeypatch.context() as m:
        m.setattr(sdpa_attention.torch.nn.functional, "scaled_dot_product_attention", _efficient)
        got = step_grads(model, lambda: compiled(input_ids=ids).logits.float().sum().backward())
    want = step_grads(model, lambda: model(input_ids=ids).logits.float().sum().backward())
    assert_grads_close(got, want)

"""Training gradients on the GPU in both memory-plan modes. A training graph usually takes
dynamic mode on CUDA (no arena), so arena mode's GPU path was exercised by inference only: there
GPT-2's fused-QKV gradient, which AOTAutograd assembles with as_strided_scatter over a zero buffer
kiln places in the arena, came out zero (the H200, seventh session). Skipped without CUDA."""
import functools

import pytest
import torch

from models.grads import assert_grads_close, step_grads

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("mode", ["arena", "default"])
def test_gpt2_train_grads_match_eager(mode, monkeypatch):
    import kiln.passes.memory as memory
    from kiln.api import kiln_backend
    if mode == "arena":
        monkeypatch.setattr(memory, "DYNAMIC_DEVICES", ())
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=8, vocab_size=8192, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).cuda()
    ids = torch.randint(0, 8192, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=functools.partial(
        kiln_backend, options={"target": "triton", "cudagraphs": False}))
    got = step_grads(model, lambda: compiled(input_ids=ids).logits.float().sum().backward())
    want = step_grads(model, lambda: model(input_ids=ids).logits.float().sum().backward())
    assert_grads_close(got, want)

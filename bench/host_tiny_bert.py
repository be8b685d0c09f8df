"""Per-call time of a tiny BERT layer (hidden 64, 2x16 tokens), where host time is all there is: eager,
Inductor, kiln with CUDA-graph replay off (the executor's own cost per step) and kiln by default.
Runs on the CPU too (target cpu).

    PYTHONPATH=$PWD python bench/host_tiny_bert.py [--profile]

``--profile``: cProfile of 2000 calls of kiln with CUDA graphs off, the functions that take most
time themselves (where the executor's per-step host time goes).
"""
import cProfile, pstats, sys, torch, kiln
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer
from host_timer import best_us
dev = "cuda" if torch.cuda.is_available() else "cpu"
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
torch.manual_seed(0)
cfg = BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=256, attn_implementation="eager")
m = BertLayer(cfg).to(dev).eval()
x = torch.randn(2, 16, 64, device=dev)
def us(f, n=2000):
    return best_us(f, n)
with torch.no_grad():
    ref = m(x)[0] if isinstance(m(x), tuple) else m(x)
    print(f"eager {us(lambda: m(x)):.1f} us")
    for name, f in [("inductor", torch.compile(m)),
                    ("kiln cg-off", kiln.compile(m, target="triton" if dev == "cuda" else "cpu", cudagraphs=False)),
                    ("kiln", kiln.compile(m, target="triton" if dev == "cuda" else "cpu"))]:
        for _ in range(5): out = f(x)
        out = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
        print(f"{name} {us(lambda: f(x)):.1f} us")
        if name == "kiln cg-off" and "--profile" in sys.argv:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(2000):
                f(x)
            sync()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        torch._dynamo.reset()

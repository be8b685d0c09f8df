"""The graphs one pipeline pass returns during a test, for asserting on what the pipeline made
of a real compile (torch.compile with the kiln backend)."""
import kiln.passes.pipeline as pipeline


def pass_outputs(monkeypatch, name: str) -> list:
    """Graphs the pass ``name`` returns from now on (for the rest of the test), in order."""
    at = next(i for i, (n, _) in enumerate(pipeline.PIPELINE) if n == name)
    fn = pipeline.PIPELINE[at][1]
    seen = []

    def keep(g, o):
        g = fn(g, o)
        seen.append(g)
        return g
    monkeypatch.setattr(pipeline, "PIPELINE", [*pipeline.PIPELINE[:at], (name, keep), *pipeline.PIPELINE[at + 1:]])
    return seen

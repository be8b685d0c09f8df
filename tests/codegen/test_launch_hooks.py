"""Whether a Triton launch hook is set, as the direct launcher decides it (no GPU needed)."""
from kiln.codegen.loader import _set


class _Chain:               # Triton 3.6+'s knobs.HookChain: hooks in .calls, empty by default
    def __init__(self, calls):
        self.calls = calls


def test_an_empty_hook_chain_is_no_hook():
    assert not _set(None)
    assert not _set(_Chain([]))
    assert _set(_Chain([print]))
    assert _set(print)

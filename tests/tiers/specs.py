"""A model spec for the CLI tests: ``tests/tiers/specs.py:small_stack``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.tiers.common import stack  # noqa: E402


def small_stack():
    return stack(d=32, h=64, layers=4)

"""Suite-wide setup: the Triton interpreter on machines without a GPU (chosen before anything
imports triton) and a per-session kernel cache directory, so runs never share compiled kernels.
(xdist workers inherit the directory from the controller, which removes it at exit.)"""
import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("KILN_VERIFY", "1")      # the IR verifier runs after every pass in tests
if "KILN_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="kiln-test-cache-")
    os.environ["KILN_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import kiln  # noqa: E402,F401  (sets up kiln before any test module imports triton)

"""Suite-wide setup: the Triton interpreter on machines without a GPU (chosen before anything
imports triton) and a per-session kernel cache directory, so runs never share compiled kernels."""
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
if "KILN_CACHE_DIR" not in os.environ:
    os.environ["KILN_CACHE_DIR"] = tempfile.mkdtemp(prefix="kiln-test-cache-")

import kiln  # noqa: E402,F401  (sets up kiln before any test module imports triton)

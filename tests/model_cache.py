"""Where the tests keep the tiny models they build (nnU-Net, Qwen2.5-VL), keyed by recipe hash.

Outside the checkout (default ~/.cache/cmrvl/test-models), so that fresh clones on the same
machine, CI's included, reuse them; CMRVL_TEST_MODEL_CACHE overrides it."""

import os
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("CMRVL_TEST_MODEL_CACHE") or Path.home() / ".cache" / "cmrvl" / "test-models")

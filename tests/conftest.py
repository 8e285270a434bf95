"""Test session setup: 8 fake CPU devices (for sharding tests), tiny configs."""

import os

# Must be set before JAX initializes its backends. The tests' models are tiny:
# XLA's compile time dominates, so compile with fewer optimizations.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Identical programs (the same tiny model trained by several tests, in this and
# in the subprocess tests) compile once: XLA's persistent cache, keyed by the
# program and the JAX version.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.expanduser("~"), ".cache", "vitjax", "xla-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402

from helpers import TINY, synthetic_dataset  # noqa: E402, I001


@pytest.fixture
def tiny_config():
  return TINY


@pytest.fixture
def tiny_dataset():
  return synthetic_dataset()

"""Test session setup: 8 fake CPU devices (for sharding tests), tiny configs."""

import os

# Must be set before JAX initializes its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from helpers import TINY, synthetic_dataset  # noqa: E402


@pytest.fixture
def tiny_config():
  return TINY


@pytest.fixture
def tiny_dataset():
  return synthetic_dataset()

"""Test-session setup: 8 simulated CPU devices so meshes and shard_map run without accelerators."""

import os

# Must be set before jax initialises its backends.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One GenEval-Shapes build (and tokenizer cache) shared by every test that trains."""
  return str(tmp_path_factory.mktemp("tfds"))

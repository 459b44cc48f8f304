"""Test-session setup: 8 simulated CPU devices so meshes and shard_map run without accelerators,
and every GCS client pointed at a local emulator (tests/gcs.py)."""

import atexit
import os
import shutil
import tempfile

from tests import commands  # noqa: E402  (imports no jax)

# Must be set before jax initialises its backends.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = commands.xla_flags(8, _flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the session and every process it starts: the command-line
# tests compile the same tiny models again and again, each in a fresh process.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="ecdit_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache

from tests import gcs  # noqa: E402  (after the environment above)

# Every GCS client of this session and of the processes it starts talks to the local emulator.
os.environ.update(gcs.ENVIRONMENT)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One GenEval-Shapes build (and tokenizer cache) shared by every test that trains."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
  """gs://BUCKET on the local GCS emulator (tests/gcs.py), started for the session."""
  server = gcs.start_server(str(tmp_path_factory.mktemp("gcs")))
  try:
    yield f"gs://{gcs.BUCKET}"
  finally:
    server.terminate()
    server.wait(timeout=30)

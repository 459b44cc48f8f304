"""A local stand-in for Google Cloud Storage: the GCS JSON API served on 127.0.0.1.

``tests/conftest.py`` points every GCS client of the test session (and of the processes it
starts) at ``ENDPOINT`` before anything imports them: gcsfs (``etils.epath``'s gs:// backend),
the C++ client inside ArrayRecord, and tensorstore (Orbax's arrays). No test can reach a real
bucket. The ``gcs_bucket`` fixture starts the server when a test first asks for it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from etils import epath

from ecdit_jax.fileio import files_under

BUCKET = "ecdit-test"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


PORT = _free_port()
ENDPOINT = f"http://127.0.0.1:{PORT}"
ENVIRONMENT = {
    "STORAGE_EMULATOR_HOST": ENDPOINT,  # gcsfs and google-cloud-storage
    "CLOUD_STORAGE_EMULATOR_ENDPOINT": ENDPOINT,  # the C++ client (ArrayRecord's reader)
    "TENSORSTORE_GCS_HTTP_URL": ENDPOINT,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",  # tensorstore: no credentials lookup
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no bucket-layout calls to a control plane
    "GOOGLE_CLOUD_PROJECT": "ecdit-test",
}


def start_server(data_dir: str) -> subprocess.Popen:
  """Starts the emulator with BUCKET created; returns once it answers."""
  command = [sys.executable, "-m", "tests.gcs_server", "-d", data_dir, "start",
             "--host=127.0.0.1", f"--port={PORT}", f"--default-bucket={BUCKET}", "--quiet"]
  server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=ROOT)
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline:
    if server.poll() is not None:
      raise RuntimeError(f"the GCS emulator exited: {server.stderr.read().decode()[-2000:]}")
    try:
      with socket.create_connection(("127.0.0.1", PORT), timeout=1):
        return server
    except OSError:
      time.sleep(0.2)
  server.kill()
  raise RuntimeError("the GCS emulator did not start within 30 s")


def upload(local_dir, url: str) -> str:
  """Copies every file under ``local_dir`` to the same relative names under ``url``."""
  root = epath.Path(local_dir)
  for path in files_under(root):
    path.copy(epath.Path(url) / path.relative_to(root), overwrite=True)
  return url


def download(url: str, local_dir) -> str:
  """Copies every object under ``url`` into ``local_dir``."""
  root = epath.Path(url)
  for path in files_under(root):
    target = epath.Path(local_dir) / path.relative_to(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    path.copy(target, overwrite=True)
  return os.fspath(local_dir)

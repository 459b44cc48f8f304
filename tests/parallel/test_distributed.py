"""Joining the multi-process runtime on a Cloud TPU VM slice: JAX reads the slice from the TPU
VM metadata server. Here each of two processes gets its own metadata server on 127.0.0.1 (the
worker number differs) and a CPU host posing as a TPU host; they must find each other with the
coordinator, process count and indices the metadata describes."""

import http.server
import json
import os
import threading

import pytest

from ecdit_jax.errors import ConfigError
from ecdit_jax.parallel import distributed
from tests.commands import free_port, start, xla_flags

# What a process runs: JAX marks a host with TPU chips as a Cloud TPU VM and, without chips,
# skips the metadata server; both are undone here so that the fake one is read.
PROCESS = """
import json, os
import jax
from jax._src import distributed as jax_distributed
from jax._src.clusters import cloud_tpu_cluster
cloud_tpu_cluster.running_in_cloud_tpu_vm = True
os.environ.pop("TPU_SKIP_MDS_QUERY", None)
from ecdit_jax.parallel import distributed
how = distributed.initialize(on_tpu=True)
print(json.dumps({"how": how, "index": jax.process_index(), "count": jax.process_count(),
                  "coordinator": jax_distributed.global_state.coordinator_address,
                  "devices": jax.device_count()}), flush=True)
"""


def _metadata_server(attributes: dict[str, str]):
  """A stand-in for the GCE metadata server's instance attributes, on 127.0.0.1."""

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802  (the http.server name)
      key = self.path.rsplit("/", 1)[-1]
      ok = (self.path.startswith("/computeMetadata/v1/instance/attributes/")
            and self.headers.get("Metadata-Flavor") == "Google" and key in attributes)
      body = attributes[key].encode() if ok else b"not found"
      self.send_response(200 if ok else 404)
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server


@pytest.mark.slow
def test_a_cloud_tpu_vm_slice_is_joined_from_its_metadata():
  port = free_port()
  servers = [_metadata_server({"agent-worker-number": str(worker),
                               "worker-network-endpoints": "127.0.0.1,127.0.0.1",
                               "tpu-env": "ACCELERATOR_TYPE: 'v4-16'\n"})
             for worker in range(2)]
  try:
    procs = []
    for server in servers:
      env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_PORT=str(port),
                 GCE_METADATA_IP=f"127.0.0.1:{server.server_address[1]}",
                 XLA_FLAGS=xla_flags(2))
      procs.append(start(["-c", PROCESS], env=env, module=False))
    results = []
    for proc in procs:
      out, err = proc.communicate(timeout=120)
      assert proc.returncode == 0, err[-3000:]
      results.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for server in servers:
      server.shutdown()
  assert [r["index"] for r in results] == [0, 1]
  for result in results:
    assert result["count"] == 2 and result["devices"] == 4
    assert result["coordinator"] == f"127.0.0.1:{port}"
    assert result["how"].startswith("Cloud TPU: process")


def test_explicit_flags_must_come_together():
  with pytest.raises(ConfigError, match="give all of --coordinator_address"):
    distributed.initialize("127.0.0.1:1234", None, None)
  with pytest.raises(ConfigError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
    distributed.initialize("127.0.0.1:1234", 2, 2)
  assert distributed.initialize(on_tpu=False) == "single process"  # a laptop: nothing to join

"""``precompute`` on a pod simulated here (two processes joined through a coordinator on
127.0.0.1): each process encodes the source records i with i % 2 == its index into its own chunk
files; the chunks read back as one dataset holding every record once, with the latents and
caption states one process computes; info.json counts all of them; a rerun redoes only an
interrupted chunk; and a resume on another process count is refused."""

import json
import os

import numpy as np
import pytest

from ecdit_jax.data.latents import INFO_FILE, LatentSource, latent_files
from ecdit_jax.encoders import random_init
from tests.commands import finish, run, run_ok, start_pod

pytestmark = pytest.mark.slow  # starts several processes: CI runs it, the fast lane skips it

COUNT = 10


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("precompute_pod")
  run_ok(["ecdit_jax.data.geneval_folder", f"--out={root / 'images'}", f"--count={COUNT}",
          "--image_size=32"])
  t5_dir, vae_dir = random_init.write_random_models(root / "weights")
  return root, t5_dir, vae_dir


def _args(inputs, out):
  root, t5_dir, vae_dir = inputs
  return ["ecdit_jax.precompute", f"--source=folder:{root / 'images'}", f"--vae={vae_dir}",
          f"--out={out}", "--image_size=32", "--chunk_size=2", "--batch_size=2",
          f"--text_encoder={t5_dir}", "--text_max_len=16", "--text_dtype=float32"]


def _records(out):
  source = LatentSource(str(out))
  return [source[i] for i in range(len(source))]


def test_processes_write_disjoint_shards_that_read_as_one_dataset(inputs):
  root = inputs[0]
  run_ok(_args(inputs, root / "one"))
  finish(start_pod(_args(inputs, root / "two"), processes=2, devices_each=2), timeout=600)

  names = [os.path.basename(path) for path in latent_files(str(root / "two"))]
  # Process p's 5 records in chunks of 2 source records: 3 files each, named by process.
  assert names == [f"latents-{p:05d}-of-00002-{c:05d}.array_record"
                   for p in range(2) for c in range(3)]
  alone, pod = _records(root / "one"), _records(root / "two")
  # Process-major order: records 0, 2, ..., 8 of process 0, then 1, 3, ..., 9 of process 1.
  order = [*range(0, COUNT, 2), *range(1, COUNT, 2)]
  assert [r["caption"] for r in pod] == [alone[i]["caption"] for i in order]
  for got, i in zip(pod, order):
    np.testing.assert_allclose(got["latent"], alone[i]["latent"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["context"], alone[i]["context"], rtol=1e-5, atol=1e-6)
  info = json.loads((root / "two" / INFO_FILE).read_text())
  assert info["count"] == COUNT and info["skipped"] == 0 and info["process_count"] == 2

  # Process 1's last chunk was interrupted: the rerun writes it again and touches nothing else.
  files = latent_files(str(root / "two"))
  os.remove(files[-1] + ".done")
  mtimes = {path: os.stat(path).st_mtime_ns for path in files[:-1]}
  finish(start_pod(_args(inputs, root / "two"), processes=2, devices_each=2), timeout=600)
  assert latent_files(str(root / "two")) == files
  assert {path: os.stat(path).st_mtime_ns for path in files[:-1]} == mtimes
  again = _records(root / "two")
  assert [r["caption"] for r in again] == [r["caption"] for r in pod]
  np.testing.assert_array_equal(again[-1]["latent"], pod[-1]["latent"])
  assert json.loads((root / "two" / INFO_FILE).read_text())["count"] == COUNT

  # One process cannot resume what two wrote: its records would go to other chunks.
  result = run(_args(inputs, root / "two"))
  assert result.returncode != 0 and "different number of processes" in result.stderr

"""Everything a run reads or writes may be in a bucket: the readers against a local GCS emulator
(tests/gcs.py) give what they give on local files, and a run trains on a latent dataset, frozen
T5 and VAE directories and a workdir that are all gs:// paths, resumes there, and samples.

What the emulator serves here: gcsfs (epath's gs:// backend) for files and listings, the C++
client inside ArrayRecord for latent chunks, and tensorstore for Orbax's checkpoint arrays.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx

from ecdit_jax.data import latents as latent_format
from ecdit_jax.data.tokenizer import load_tokenizer
from ecdit_jax.encoders import clip_tokenizer, random_init
from ecdit_jax.encoders.t5 import load_t5_encoder, load_t5_tokenizer
from ecdit_jax.encoders.vae import load_vae
from ecdit_jax.eval import fid
from tests import gcs
from tests.commands import run_ok
from tests.encoders.random_clip import write_random_clip_text

CAPTIONS = ["a red circle", "two blue squares above a green triangle"]


def _params(module):
  return jax.tree.map(np.asarray, nnx.state(module, nnx.Param))


def test_weights_tokenizers_and_statistics_read_from_a_bucket(gcs_bucket, tmp_path):
  local = tmp_path / "weights"
  t5_dir, _ = random_init.write_random_models(local)
  clip_dir = local / "clip"
  clip_dir.mkdir()
  write_random_clip_text(clip_dir)
  stats = fid.FeatureStats()
  stats.update(np.random.default_rng(0).normal(size=(16, 4)))
  stats.save(local / "reference.npz")
  remote = gcs.upload(local, f"{gcs_bucket}/readers")

  for kind, loader in (("t5", load_t5_encoder), ("vae", load_vae)):
    here, there = _params(loader(local / kind)), _params(loader(f"{remote}/{kind}"))
    jax.tree.map(np.testing.assert_array_equal, there, here)
  here, there = load_t5_tokenizer(t5_dir), load_t5_tokenizer(f"{remote}/t5")
  np.testing.assert_array_equal(there.encode_batch(CAPTIONS, 16), here.encode_batch(CAPTIONS, 16))
  spiece = load_tokenizer(f"{remote}/t5/spiece.model")
  assert spiece.vocab_size == here.vocab_size
  here = clip_tokenizer.load_clip_tokenizer(clip_dir)
  there = clip_tokenizer.load_clip_tokenizer(f"{remote}/clip")
  np.testing.assert_array_equal(there.encode_batch(CAPTIONS, 12)[0],
                                here.encode_batch(CAPTIONS, 12)[0])
  for want, got in zip(fid.load_stats(local / "reference.npz"),
                       fid.load_stats(f"{remote}/reference.npz")):
    np.testing.assert_array_equal(got, want)


def test_latent_chunks_written_to_and_read_from_a_bucket(gcs_bucket):
  directory = f"{gcs_bucket}/latent_chunks"
  rng = np.random.default_rng(1)
  records = [(rng.normal(size=(4, 4, 4)).astype(np.float32), f"caption {i}",
              rng.normal(size=(i + 1, 8)).astype(np.float32)) for i in range(5)]
  latent_format.write_chunk(latent_format.chunk_path(directory, 0, 1, 0),
                            [latent_format.encode_record(*r) for r in records[:3]])
  latent_format.write_chunk(latent_format.chunk_path(directory, 0, 1, 1),
                            [latent_format.encode_record(*r) for r in records[3:]])
  # A chunk without its marker (an interrupted write) is not part of the dataset.
  epath.Path(latent_format.chunk_path(directory, 0, 1, 2)).write_bytes(b"partial")
  latent_format.write_info(directory, {"latent_shape": [4, 4, 4], "count": 5})
  latent_format.write_null_context(directory, np.ones((3, 8), np.float32), 1)

  source = latent_format.LatentSource(directory)
  assert len(source) == 5 and len(source.paths) == 2
  for i, (latent, caption, context) in enumerate(records):
    record = source[i]
    np.testing.assert_array_equal(record["latent"], latent)
    np.testing.assert_array_equal(record["context"], context)
    assert record["caption"] == caption.encode()
  assert latent_format.read_info(directory) == {"latent_shape": [4, 4, 4], "count": 5}
  null, length = latent_format.read_null_context(directory)
  assert null.shape == (3, 8) and length == 1
  with pytest.raises(FileExistsError):
    latent_format.write_chunk(latent_format.chunk_path(directory, 0, 1, 0), [])


@pytest.mark.slow  # trains: CI runs it, the fast lane skips it
def test_a_run_on_a_bucket_trains_resumes_and_samples(gcs_bucket, tmp_path):
  images = tmp_path / "images"
  run_ok(["ecdit_jax.data.geneval_folder", f"--out={images}", "--count=8", "--image_size=32"])
  images_remote = gcs.upload(images, f"{gcs_bucket}/run/images")
  random_init.write_random_models(tmp_path / "weights")
  weights = gcs.upload(tmp_path / "weights", f"{gcs_bucket}/run/weights")
  latents, workdir = f"{gcs_bucket}/run/latents", f"{gcs_bucket}/run/workdir"
  run_ok(["ecdit_jax.precompute", f"--source=folder:{images_remote}", f"--vae={weights}/vae",
          f"--out={latents}", "--image_size=32", "--chunk_size=4", f"--text_encoder={weights}/t5",
          "--text_max_len=16", "--text_dtype=float32"])
  info = latent_format.read_info(latents)
  assert info["count"] == 8 and info["vae"] == f"{weights}/vae"

  train = ["ecdit_jax.main", "--config=configs/t2i_256.py:XL-32E,runlocal", f"--workdir={workdir}",
           f"--config.data.dataset=latents:{latents}",
           f"--config.pretrained.text_encoder={weights}/t5", f"--config.pretrained.vae={weights}/vae",
           "--config.num_train_steps=2", "--config.log_every_steps=1",
           "--config.checkpoint_every_steps=2", "--config.sample_every_steps=2",
           "--config.sample.num_steps=2", "--config.model.hidden_size=32",
           "--config.model.num_experts=4"]
  run_ok(train)
  resumed = run_ok([*train, "--config.num_train_steps=3"])
  assert "resumed from step 2" in resumed.stdout

  rows = [json.loads(line) for line in
          epath.Path(f"{workdir}/metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows] == [1, 2, 3]
  assert sorted(p.name for p in epath.Path(f"{workdir}/checkpoints").iterdir()) == ["2", "3"]
  assert epath.Path(f"{workdir}/samples/step_0000002.png").exists()
  assert any(epath.Path(f"{workdir}/tensorboard").iterdir())

  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle\n")
  outdir = tmp_path / "samples"
  run_ok(["ecdit_jax.sample", f"--workdir={workdir}", f"--prompts={prompts}",
          f"--outdir={outdir}", "--steps=2"])
  assert [p.name for p in outdir.iterdir()] == ["00000.png"]


def test_the_compilation_cache_in_a_bucket_is_written_and_reused(gcs_bucket, tmp_path):
  """What tpu_pod.sh sets on every worker: JAX_COMPILATION_CACHE_DIR=gs://..., so a restarted
  run finds its executables there instead of compiling again."""
  cache = f"{gcs_bucket}/compilation_cache"
  script = tmp_path / "compile.py"
  script.write_text(
      "import jax, jax.numpy as jnp\n"
      "events = []\n"
      "jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))\n"
      "f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1)\n"
      "f(jnp.ones((64, 64))).block_until_ready()\n"
      "print('cache hits', sum('cache_hits' in name for name in events))\n")
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  first = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
  entries = list(epath.Path(cache).iterdir())
  assert entries, first.stderr[-2000:]
  second = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
  assert "cache hits 0" in first.stdout, first.stdout
  hits = int(second.stdout.split("cache hits")[-1])
  assert hits > 0, second.stdout + second.stderr[-2000:]
  assert sorted(entries) == sorted(epath.Path(cache).iterdir())  # nothing compiled anew

"""Text-to-image on VAE latents with a frozen T5, end to end on CPU with random-weight encoders.

The laptop sequence of configs/t2i_256.py: captioned images -> random T5 and VAE directories ->
``precompute`` (latents and the captions' T5 states) -> ``main`` (configs/t2i_256.py:XL-32E,
runlocal, shrunk further, training on the cached states) -> resumed -> ``sample``.
Then the sampler's decoding is checked against an independent VAE decode of its own latents.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from ecdit_jax.encoders import random_init
from ecdit_jax.encoders.vae import load_vae
from ecdit_jax.checkpoint import Checkpointer
from ecdit_jax.errors import ConfigError
from ecdit_jax.inference import run as inference
from ecdit_jax.inference.images import to_uint8

pytestmark = pytest.mark.slow  # trains, or runs the tools: CI runs it, the fast lane skips it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 32  # pixels; the random VAE halves it: 16x16x4 latents, as runlocal expects
PROMPTS = ["a red circle", "a blue square"]


def run(args):
  result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("t2i")
  images = root / "images"
  run(["ecdit_jax.data.geneval_folder", f"--out={images}", "--count=8",
       f"--image_size={IMAGE_SIZE}"])
  t5_dir, vae_dir = random_init.write_random_models(root / "weights")
  latents = root / "latents"
  run(["ecdit_jax.precompute", f"--source=folder:{images}", f"--vae={vae_dir}",
       f"--out={latents}", f"--image_size={IMAGE_SIZE}", "--batch_size=8",
       f"--text_encoder={t5_dir}", "--text_max_len=16", "--text_dtype=float32"])
  workdir = root / "run"
  train = [
      "ecdit_jax.main", "--config=configs/t2i_256.py:XL-32E,runlocal", f"--workdir={workdir}",
      f"--config.data.dataset=latents:{latents}", f"--config.pretrained.text_encoder={t5_dir}",
      f"--config.pretrained.vae={vae_dir}", "--config.num_train_steps=2",
      "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
      "--config.sample_every_steps=2", "--config.sample.num_steps=2",
      "--config.model.hidden_size=32", "--config.model.num_experts=4"]
  assert "step 2/2" in run(train).stdout
  # Extended by a step: it resumes from the checkpoint, on the same cached captions.
  resumed = run([*train, "--config.num_train_steps=3"])
  assert "resumed from step 2" in resumed.stdout + resumed.stderr
  return root, workdir, t5_dir, vae_dir


def test_training_on_latents_with_a_frozen_t5_then_sampling(trained):
  root, workdir, t5_dir, _ = trained
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [row["step"] for row in rows] == [1, 2, 3]
  assert all(np.isfinite(row["loss"]) for row in rows)
  assert all(row["skipped_records"] == 0 for row in rows)
  assert Checkpointer(str(workdir)).all_steps() == [2, 3]
  assert json.loads((workdir / "config.json").read_text())["data"]["cached_context"]
  # The frozen encoder is the run's tokenizer: none is trained or copied; config.json names it.
  assert not (workdir / "tokenizer.model").exists()
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["pretrained"]["text_encoder"] == t5_dir and saved["model"]["text_encoder"] == "t5"
  # The in-training grid holds decoded 32x32 images, enlarged 4x: four a row.
  grid = Image.open(workdir / "samples" / "step_0000002.png")
  assert grid.size[0] == 4 * IMAGE_SIZE * 4

  prompts = root / "prompts.txt"
  prompts.write_text("\n".join(PROMPTS) + "\n")
  outdir = root / "samples"
  run(["ecdit_jax.sample", f"--workdir={workdir}", f"--prompts={prompts}", f"--outdir={outdir}",
       "--steps=2", "--seed=1"])
  assert sorted(os.listdir(outdir)) == ["00000.png", "00001.png"]
  pngs = np.stack([np.asarray(Image.open(outdir / name)) for name in sorted(os.listdir(outdir))])
  assert pngs.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)  # the VAE's output size, not the latents'

  # Weights that moved since training: an error names the setting, the overrides find them.
  moved = root / "moved"
  shutil.move(os.path.dirname(t5_dir), moved)
  with pytest.raises(ConfigError, match="config.pretrained.text_encoder"):
    inference.load_run(str(workdir))
  run_ = inference.load_run(str(workdir), pretrained_overrides={
      "text_encoder": str(moved / "t5"), "vae": str(moved / "vae")})
  tokens = run_.tokenizer.encode_batch(PROMPTS, run_.model_config.text_max_len)
  settings = dict(num_steps=2, cfg_scale=run_.config.sample.cfg_scale, method="euler")
  images = inference.make_run_sampler(run_, **settings)(run_.params, tokens, run_.null_tokens, 1)
  sampled_latents = inference.make_run_sampler(run_, decode_latents=False, **settings)(
      run_.params, tokens, run_.null_tokens, 1)
  assert sampled_latents.shape == (2, 16, 16, 4) and images.shape == (2, 32, 32, 3)
  # The decode stage, checked independently: the VAE loaded on its own decodes the latents.
  expected = jax.jit(load_vae(moved / "vae").decode)(sampled_latents)
  np.testing.assert_allclose(images, expected, rtol=1e-4, atol=1e-4)
  assert np.abs(to_uint8(images).astype(int) - pngs.astype(int)).max() <= 1

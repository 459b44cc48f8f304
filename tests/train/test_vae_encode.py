"""Training on latents encoded from images as they are read (config.data.vae_encode)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ecdit_jax.data import pipeline
from ecdit_jax.data.latents import center_crop_resize
from ecdit_jax.encoders import random_init, vae as vae_lib
from ecdit_jax.config import TrainConfig
from ecdit_jax.encoders import frozen
from ecdit_jax.errors import ConfigError
from ecdit_jax.parallel import mesh as mesh_lib
from ecdit_jax.train.loop import train_and_evaluate
from tests.tiny import tiny_train_config

pytestmark = pytest.mark.slow  # trains, or runs the tools: CI runs it, the fast lane skips it


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("vae")
  random_init.write_random_vae(path)  # 2 stages: 2x downsampling, 4 latent channels
  return str(path)


def _config(data_dir, vae_dir, **overrides):
  # 16x16x4 latents of 32x32 GenEval-Shapes images, through a VAE that downsamples 2x.
  values = {"model.image_size": 16, "model.in_channels": 4, "model.patch_size": 2,
            "data.vae_encode": True, "pretrained.vae": vae_dir, "pretrained.dtype": "float32",
            "num_train_steps": 2, "checkpoint_every_steps": 2, "sample_every_steps": 2,
            "eval_every_steps": 0,
            "sample.prompts": ("a red circle", "two squares")}
  values.update(overrides)
  return tiny_train_config(data_dir, **values)


# steps_per_call=2: the two encoded batches are stacked on the devices and run in one call.
@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_trains_on_encoded_images_and_samples_decoded_images(vae_dir, tmp_path, steps_per_call):
  workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "tfds")
  state = train_and_evaluate(_config(data_dir, vae_dir, steps_per_call=steps_per_call,
                                     log_every_steps=2), workdir)
  # GenEval-Shapes is drawn at the pixels the VAE encodes (16 x 2), not at the latents' 16.
  assert [name.split("_")[0] for name in os.listdir(os.path.join(data_dir, "geneval_shapes"))
          if name.startswith("s")] == ["s32"]
  assert int(state.step) == 2
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f if "loss" in line]
  assert losses and all(np.isfinite(losses))
  grid = os.path.join(workdir, "samples", "step_0000002.png")
  assert Image.open(grid).size[0] >= 32  # decoded to pixels, not 16x16x4 latents


def test_the_encode_stage_gives_the_vae_posterior_mean(vae_dir):
  model_config = TrainConfig.from_mapping(_config("", vae_dir)).model
  vae = frozen.load_frozen_vae(vae_dir, "float32", model_config)
  mesh = mesh_lib.create_mesh(mesh_lib.MeshConfig())
  encode = frozen.make_image_encoder(vae.placed(mesh), mesh)
  images = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
  latents = encode({"image": images, "tokens": np.zeros((8, 4), np.int32)})["image"]
  expected = vae_lib.load_vae(vae_dir).latents_from_images(images)
  assert latents.shape == (8, 16, 16, 4)
  np.testing.assert_allclose(np.asarray(latents), np.asarray(expected), rtol=1e-4, atol=1e-5)


def test_images_of_any_size_are_center_cropped_and_resized_when_asked():
  image = np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)
  assert pipeline.decode_image(image, 32) is None  # wrong size: a bad record by default
  np.testing.assert_array_equal(pipeline.decode_image(image, 32, resize=True),
                                center_crop_resize(image, 32))


def test_config_errors_name_the_key(data_dir, vae_dir, tmp_path):
  with pytest.raises(ConfigError, match="config.pretrained.vae"):
    train_and_evaluate(_config(data_dir, vae_dir, **{"pretrained.vae": ""}), str(tmp_path / "a"))
  with pytest.raises(ConfigError, match="config.data.vae_encode"):
    train_and_evaluate(_config(data_dir, vae_dir, **{"data.dataset": "latents:" + vae_dir}),
                       str(tmp_path / "b"))

"""Random T5 and VAE directories: our loaders, exact parameter round trips, PyTorch libraries."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from ecdit_jax.encoders import random_init, safetensors_weights, t5, vae
from ecdit_jax.model.keys import ParamKeys

TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """(t5 dir, vae dir) as the command line writes them by default."""
  return random_init.write_random_models(tmp_path_factory.mktemp("random"))


def flat_parameters(module: nnx.Module) -> dict[tuple, np.ndarray]:
  return {path: np.asarray(variable[...])
          for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def assert_same_parameters(actual: nnx.Module, expected: nnx.Module):
  actual, expected = flat_parameters(actual), flat_parameters(expected)
  assert list(actual) == list(expected)
  for path, value in expected.items():
    assert actual[path].dtype == value.dtype, path
    np.testing.assert_array_equal(actual[path], value, err_msg=str(path))


def padded_ids(tokenizer, captions, max_len=12):
  ids = tokenizer.encode_batch(captions, max_len)
  return ids, (ids != tokenizer.pad_id).astype(np.int32)


def test_directories_load_with_our_loaders(written):
  t5_dir, vae_dir = written
  assert sorted(os.listdir(t5_dir)) == ["config.json", "model.safetensors", "spiece.model"]
  assert sorted(os.listdir(vae_dir)) == ["config.json", "diffusion_pytorch_model.safetensors"]
  tokenizer = t5.load_t5_tokenizer(t5_dir)
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2)
  # Trained on the GenEval-Shapes captions: those encode without unknown pieces.
  captions = random_init.default_captions()
  assert len(set(captions)) == len(captions) > 200
  for caption in captions[::7]:
    assert tokenizer.unk_id not in tokenizer.encode(caption)
    assert tokenizer.decode(tokenizer.encode(caption)) == caption

  encoder = t5.load_t5_encoder(t5_dir)
  config = encoder.config
  assert (config.vocab_size, config.d_model) == (tokenizer.vocab_size, 32)
  assert config.is_gated_act and config.dense_act_fn == "gelu_new"
  ids, mask = padded_ids(tokenizer, captions[:3])
  hidden = np.asarray(encoder(ids, mask))
  assert hidden.shape == (3, 12, 32) and np.isfinite(hidden).all()

  autoencoder = vae.load_vae(vae_dir)
  assert autoencoder.config.downsample_factor == 2 and autoencoder.config.latent_channels == 4
  images = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  latents = autoencoder.latents_from_images(images)
  assert latents.shape == (1, 8, 8, 4)
  assert np.isfinite(np.asarray(autoencoder.decode(latents))).all()


def _tiny_t5():
  config = t5.T5Config(vocab_size=20, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16,
                       feed_forward_proj="gated-gelu")
  return t5.T5Encoder(config, rngs=ParamKeys(0))


def _tiny_vae():
  config = vae.AutoencoderKLConfig(
      block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4)
  return vae.AutoencoderKL(config, rngs=ParamKeys(0))


@pytest.mark.parametrize("build", [_tiny_t5, _tiny_vae], ids=["t5", "vae"])
def test_parameters_round_trip_exactly(build, tmp_path):
  module = random_init.random_module(build, seed=1)
  path = tmp_path / "weights.safetensors"
  safetensors_weights.save_parameters(module, path)
  stored = load_file(str(path))
  assert len(stored) == len(flat_parameters(module))
  # PyTorch layouts: Linear (out, in), Conv (out, in, h, w).
  if build is _tiny_vae:
    assert stored["encoder.conv_in.weight"].shape == (8, 3, 3, 3)
    assert stored["decoder.mid_block.attentions.0.to_q.weight"].shape == (16, 16)
  else:
    assert stored["encoder.block.0.layer.1.DenseReluDense.wo.weight"].shape == (16, 24)
  with contextlib.closing(safetensors_weights.SafetensorsReader(tmp_path, ["weights.safetensors"])
                          ) as reader:
    loaded = safetensors_weights.load_parameters(nnx.eval_shape(build), reader)
  assert_same_parameters(loaded, module)


def test_written_parameters_follow_the_seed(written):
  t5_dir, vae_dir = written
  encoder = t5.load_t5_encoder(t5_dir)
  expected = random_init.random_module(lambda: t5.T5Encoder(encoder.config, rngs=ParamKeys(0)))
  assert_same_parameters(encoder, expected)
  autoencoder = vae.load_vae(vae_dir)
  other = random_init.random_module(
      lambda: vae.AutoencoderKL(autoencoder.config, rngs=ParamKeys(0)), seed=1)
  assert not np.array_equal(other.encoder.conv_in.kernel[...],
                            autoencoder.encoder.conv_in.kernel[...])


def test_transformers_loads_the_t5_directory(written):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  t5_dir, _ = written
  hf_model, info = transformers.T5EncoderModel.from_pretrained(t5_dir, output_loading_info=True)
  assert not any(info[name] for name in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  tokenizer = t5.load_t5_tokenizer(t5_dir)
  ids, mask = padded_ids(tokenizer, ["a red circle to the left of a blue square", "two squares",
                                     "a cyan triangle"])
  with torch.no_grad():
    expected = hf_model.eval()(input_ids=torch.from_numpy(ids).long(),
                               attention_mask=torch.from_numpy(mask).long()).last_hidden_state
  np.testing.assert_allclose(t5.load_t5_encoder(t5_dir)(ids, mask), expected.numpy(),
                             **TOLERANCE)


def test_diffusers_loads_the_vae_directory(written):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  _, vae_dir = written
  hf_model, info = diffusers.AutoencoderKL.from_pretrained(vae_dir, output_loading_info=True)
  assert not any(info[name] for name in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  model = vae.load_vae(vae_dir)
  images = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  z = np.random.default_rng(2).normal(size=(2, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    posterior = hf_model.eval().encode(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    decoded = hf_model.decode(torch.from_numpy(z.transpose(0, 3, 1, 2).copy())).sample
  assert hf_model.config.scaling_factor == model.config.scaling_factor
  mean, logvar = model.encode(images)
  np.testing.assert_allclose(mean, posterior.latent_dist.mean.numpy().transpose(0, 2, 3, 1),
                             **TOLERANCE)
  np.testing.assert_allclose(logvar, posterior.latent_dist.logvar.numpy().transpose(0, 2, 3, 1),
                             **TOLERANCE)
  np.testing.assert_allclose(model.decode(model.scale_latents(z)),
                             decoded.numpy().transpose(0, 2, 3, 1), **TOLERANCE)


def test_command_line_with_captions_file(written, tmp_path):
  captions = tmp_path / "captions.txt"
  captions.write_text("a zebra next to a jukebox\n\n  an ox and a quokka  \n")
  out = tmp_path / "models"
  command = [sys.executable, "-m", "ecdit_jax.encoders.random_init", f"--out={out}",
             f"--captions={captions}", "--seed=3"]
  result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False,
                          cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr
  tokenizer = t5.load_t5_tokenizer(out / "t5")
  # Letters of these captions never occur in the default ones.
  for caption in ("a zebra next to a jukebox", "an ox and a quokka"):
    assert tokenizer.unk_id not in tokenizer.encode(caption)
  assert tokenizer.unk_id in t5.load_t5_tokenizer(written[0]).encode("a zebra")
  seeded = vae.load_vae(out / "vae")
  default = vae.load_vae(written[1])
  assert not np.array_equal(seeded.encoder.conv_in.kernel[...],
                            default.encoder.conv_in.kernel[...])

  # Never overwrites.
  result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False,
                          cwd=REPO_ROOT)
  assert result.returncode != 0 and "not empty" in result.stderr


def test_refuses_non_empty_directories_and_bad_configs(tmp_path):
  (tmp_path / "vae").mkdir()
  (tmp_path / "vae" / "keep.txt").write_text("precious")
  with pytest.raises(FileExistsError, match="not empty"):
    random_init.write_random_models(tmp_path)
  assert not (tmp_path / "t5").exists()
  with pytest.raises(ValueError, match="norm_num_groups"):
    random_init.write_random_vae(tmp_path / "odd", block_out_channels=(6, 12))
  with pytest.raises(ValueError, match="buckets"):
    random_init.write_random_t5(tmp_path / "t5_bad", ["a b"], relative_attention_num_buckets=2)
  assert not (tmp_path / "odd").exists() and not (tmp_path / "t5_bad").exists()
  blank = tmp_path / "blank.txt"
  blank.write_text("\n  \n")
  with pytest.raises(ValueError, match="no captions"):
    random_init.read_captions(blank)

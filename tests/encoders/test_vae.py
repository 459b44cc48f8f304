"""The NNX AutoencoderKL against ``diffusers``: moments, decoding, scaling, checkpoint errors."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from safetensors.numpy import load_file, save_file

from ecdit_jax.encoders import convert_torch, vae
from ecdit_jax.errors import ConfigError

WEIGHTS = "diffusion_pytorch_model.safetensors"
# Config overrides: an SD-like two-stage VAE, and an SD3-like three-stage one with SD3's scale and
# shift, 16 latent channels and no (post-)quantisation convs.
CASES = {
    "sd": {"block_out_channels": (32, 64), "latent_channels": 4, "norm_num_groups": 8,
           "scaling_factor": 0.18215},
    "sd3": {"block_out_channels": (32, 32, 64), "latent_channels": 16, "norm_num_groups": 16,
            "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False,
            "use_post_quant_conv": False},
}
IMAGE_SHAPES = ((32, 32), (32, 48))


def random_hf_vae(seed: int = 0, **overrides):
  """A small random diffusers VAE whose GroupNorms and biases are not at their initial values."""
  stages = len(overrides.get("block_out_channels", CASES["sd"]["block_out_channels"]))
  config = dict(down_block_types=("DownEncoderBlock2D",) * stages,
                up_block_types=("UpDecoderBlock2D",) * stages, layers_per_block=1, sample_size=32,
                **CASES["sd"])
  config.update(overrides)
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("bias"):
        param.copy_(0.2 * torch.randn_like(param))
      elif "norm" in name:  # GroupNorm scales
        param.copy_(1.0 + 0.3 * torch.randn_like(param))
  return model


def to_torch(x: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def to_nhwc(x) -> np.ndarray:
  return x.numpy().transpose(0, 2, 3, 1)


def images(shape, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, size=(2, *shape, 3)).astype(np.float32)


def assert_close(actual, expected):
  """1e-4 relative, with an absolute floor of 1e-5 of the output's scale for values near zero."""
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4,
                             atol=1e-5 * float(np.abs(expected).max()))


@pytest.fixture(scope="module", params=sorted(CASES))
def vae_pair(request, tmp_path_factory):
  hf_model = random_hf_vae(**CASES[request.param])
  model_dir = tmp_path_factory.mktemp(request.param)
  hf_model.save_pretrained(model_dir, safe_serialization=True)
  return hf_model, vae.load_vae(model_dir), model_dir


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("sd_errors")
  random_hf_vae(seed=1).save_pretrained(model_dir, safe_serialization=True)
  return model_dir


@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_encode_matches_diffusers(vae_pair, shape):
  hf_model, model, _ = vae_pair
  x = images(shape, seed=2)
  with torch.no_grad():
    posterior = hf_model.encode(to_torch(x)).latent_dist
  mean, logvar = model.encode(x)
  factor = model.config.downsample_factor
  assert mean.shape == (2, shape[0] // factor, shape[1] // factor, model.config.latent_channels)
  assert_close(mean, to_nhwc(posterior.mean))
  assert_close(logvar, to_nhwc(posterior.logvar))


@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_matches_diffusers(vae_pair, shape):
  hf_model, model, _ = vae_pair
  factor, channels = model.config.downsample_factor, model.config.latent_channels
  z = np.random.default_rng(3).normal(
      size=(2, shape[0] // factor, shape[1] // factor, channels)).astype(np.float32)
  with torch.no_grad():
    expected = to_nhwc(hf_model.decode(to_torch(z)).sample)
  decoded = model.decode(model.scale_latents(z))
  assert decoded.shape == (2, *shape, 3)
  assert_close(decoded, expected)


def test_latent_scaling_round_trip(vae_pair):
  hf_model, model, _ = vae_pair
  config = hf_model.config
  shift = config.shift_factor or 0.0
  x = images((32, 32), seed=4)
  with torch.no_grad():
    posterior = hf_model.encode(to_torch(x)).latent_dist
    hf_latents = (posterior.mean - shift) * config.scaling_factor
    hf_decoded = to_nhwc(hf_model.decode(hf_latents / config.scaling_factor + shift).sample)
  latents = model.latents_from_images(x)
  assert_close(latents, to_nhwc(hf_latents))
  assert_close(model.decode(latents), hf_decoded)

  # With a key: a posterior sample, mean + std * noise, scaled the same way.
  key = jax.random.key(5)
  mean, logvar = model.encode(x)
  noise = jax.random.normal(key, mean.shape)
  sampled = model.latents_from_images(x, key)
  assert_close(sampled, model.scale_latents(mean + np.exp(0.5 * np.asarray(logvar)) * noise))
  assert not np.allclose(sampled, latents)


def test_sharded_checkpoint_loads_the_same(vae_pair, tmp_path):
  hf_model, model, _ = vae_pair
  hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
  assert (tmp_path / f"{WEIGHTS}.index.json").exists()
  sharded = vae.load_vae(tmp_path)
  x = images((16, 16), seed=6)
  np.testing.assert_array_equal(sharded.encode(x)[0], model.encode(x)[0])


def test_pytorch_bin_checkpoint_is_refused_then_converted_and_matches_diffusers(tmp_path):
  hf_model = random_hf_vae(seed=8)
  hf_model.save_pretrained(tmp_path, safe_serialization=False)
  assert (tmp_path / "diffusion_pytorch_model.bin").exists()
  assert not list(tmp_path.glob("*.safetensors*"))
  with pytest.raises(ConfigError, match="convert_torch"):
    vae.load_vae(tmp_path)
  assert convert_torch.convert(str(tmp_path)) == [str(tmp_path / WEIGHTS)]
  model = vae.load_vae(tmp_path)
  x = images((16, 16), seed=9)
  z = np.random.default_rng(10).normal(size=(2, 8, 8, 4)).astype(np.float32)  # 16x16 decoded
  with torch.no_grad():
    expected_mean = to_nhwc(hf_model.encode(to_torch(x)).latent_dist.mean)
    expected_decoded = to_nhwc(hf_model.decode(to_torch(z)).sample)
  assert_close(model.encode(x)[0], expected_mean)
  assert_close(model.decode(model.scale_latents(z)), expected_decoded)


def _copy_checkpoint(source, target, edit=None, weights_name=WEIGHTS):
  shutil.copy(source / "config.json", target / "config.json")
  tensors = load_file(str(source / WEIGHTS))
  if edit is not None:
    edit(tensors)
  save_file(tensors, str(target / weights_name))


def test_legacy_attention_names_and_generic_file_name(sd_dir, tmp_path):
  reference = vae.load_vae(sd_dir)

  def to_legacy(tensors):
    for key in [k for k in tensors if ".attentions." in k]:
      for new, old in vae.LEGACY_ATTENTION_NAMES.items():
        if f".{new}." in key:
          value = tensors.pop(key)
          # Older conversions also kept the projections as 1x1 convs.
          tensors[key.replace(f".{new}.", f".{old}.")] = (
              value[:, :, None, None] if value.ndim == 2 else value)

  _copy_checkpoint(sd_dir, tmp_path, to_legacy, weights_name="model.safetensors")
  assert not any(".to_q." in key for key in load_file(str(tmp_path / "model.safetensors")))
  legacy = vae.load_vae(tmp_path)
  x = images((16, 16), seed=7)
  np.testing.assert_array_equal(legacy.encode(x)[0], reference.encode(x)[0])
  z = np.asarray(reference.latents_from_images(x))
  np.testing.assert_array_equal(legacy.decode(z), reference.decode(z))


def test_missing_key_names_key_and_file(sd_dir, tmp_path):
  key = "decoder.mid_block.attentions.0.to_out.0.bias"
  _copy_checkpoint(sd_dir, tmp_path, lambda tensors: tensors.pop(key))
  with pytest.raises(KeyError, match=key) as error:
    vae.load_vae(tmp_path)
  assert str(tmp_path / WEIGHTS) in str(error.value)


def test_original_ldm_layout_is_named(sd_dir, tmp_path):
  def to_ldm(tensors):
    tensors["encoder.down.0.block.0.norm1.weight"] = tensors.pop(
        "encoder.down_blocks.0.resnets.0.norm1.weight")

  _copy_checkpoint(sd_dir, tmp_path, to_ldm)
  with pytest.raises(KeyError, match="original latent-diffusion layout"):
    vae.load_vae(tmp_path)


def test_wrong_shape_names_key_and_file(sd_dir, tmp_path):
  key = "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"

  def shrink(tensors):
    tensors[key] = tensors[key][:, :16].copy()

  _copy_checkpoint(sd_dir, tmp_path, shrink)
  with pytest.raises(ValueError, match=key) as error:
    vae.load_vae(tmp_path)
  assert str(tmp_path / WEIGHTS) in str(error.value)


def test_missing_files_raise_file_not_found(sd_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="does-not-exist"):
    vae.load_vae(tmp_path / "does-not-exist")
  with pytest.raises(FileNotFoundError, match="config.json"):
    vae.load_vae(tmp_path)
  shutil.copy(sd_dir / "config.json", tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match=WEIGHTS) as error:
    vae.load_vae(tmp_path)
  assert "diffusion_pytorch_model.bin" in str(error.value)


def test_unsupported_config_is_rejected(sd_dir):
  with open(sd_dir / "config.json", encoding="utf-8") as f:
    values = json.load(f)
  config = vae.AutoencoderKLConfig.from_dict(values)
  assert config.block_out_channels == (32, 64) and config.shift_factor is None
  assert config.shift == 0.0 and config.downsample_factor == 2
  with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
    vae.AutoencoderKLConfig.from_dict(
        {**values, "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
  with pytest.raises(ValueError, match="up_block_types has 1"):
    vae.AutoencoderKLConfig.from_dict({**values, "up_block_types": ["UpDecoderBlock2D"]})
  with pytest.raises(ValueError, match="act_fn"):
    vae.AutoencoderKLConfig.from_dict({**values, "act_fn": "gelu"})

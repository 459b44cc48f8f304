"""The Stable Diffusion VAE (``diffusers``' ``AutoencoderKL``) in Flax NNX.

Images (B, H, W, 3) in [-1, 1] map to a diagonal Gaussian over (B, H/f, W/f, latent_channels)
latents, f = 2^(len(block_out_channels) - 1) (8 for the SD, SDXL and SD3 VAEs), and latents map
back to images. The diffusion model works on *scaled* latents, ``(z - shift_factor) *
scaling_factor``, which have roughly unit variance; ``latents_from_images`` and ``decode`` apply
and undo that scaling so that callers only ever see scaled latents.

Numerics follow ``diffusers`` in float32; the blocks are in ``vae_blocks``. Convolutions and
matrix products run at ``Precision.HIGHEST`` by default: on GPUs the default precision uses TF32,
which moves decoded pixels by about 1e-3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re

import jax
import jax.numpy as jnp
from flax import nnx

from ecdit_jax.encoders.safetensors_weights import (
  CheckpointReader,
  config_file,
  dataclass_from_mapping,
  load_parameters,
  open_checkpoint,
)
from ecdit_jax.encoders.vae_blocks import Decoder, Encoder, conv
from ecdit_jax.fileio import read_json
from ecdit_jax.model.keys import ParamKeys

# diffusers clips the log-variance to this range before using it.
LOGVAR_RANGE = (-30.0, 20.0)
# Weight files in order of preference: diffusers' name first, then the generic one; PyTorch
# pickles only where no safetensors file exists.
WEIGHT_FILE_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
BIN_WEIGHT_FILE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")  # refused
# Checkpoints saved before diffusers renamed its attention layers use these names; diffusers
# renames them on load, and so do we.
LEGACY_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+\.)(to_q|to_k|to_v|to_out\.0)(\.\w+)$")
# Prefixes of the original latent-diffusion (CompVis) layout, which uses different module names.
_LDM_PREFIXES = ("encoder.down.", "encoder.mid.", "decoder.up.", "decoder.mid.")


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
  """The fields of a diffusers ``AutoencoderKL`` ``config.json`` that shape the model.

  Defaults are diffusers'. ``latents_mean``/``latents_std`` (null for SD, SDXL and SD3) are not
  read: the model itself never uses them.
  """

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | tuple[int, ...] = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True

  def __post_init__(self):
    # JSON gives lists; frozen dataclasses want hashable tuples.
    for name in ("down_block_types", "up_block_types", "block_out_channels", "sample_size"):
      value = getattr(self, name)
      if isinstance(value, list):
        object.__setattr__(self, name, tuple(value))
    stages = len(self.block_out_channels)
    if stages == 0:
      raise ValueError("block_out_channels is empty")
    for name, kind in (("down_block_types", "DownEncoderBlock2D"),
                       ("up_block_types", "UpDecoderBlock2D")):
      types = getattr(self, name)
      if len(types) != stages:
        raise ValueError(f"{name} has {len(types)} entries but block_out_channels has {stages}")
      if any(t != kind for t in types):
        raise ValueError(f"unsupported {name} {types}; only {kind} is implemented")
    if self.act_fn not in ("silu", "swish"):
      raise ValueError(f"unsupported act_fn {self.act_fn!r}; only silu is implemented")
    if self.scaling_factor == 0:
      raise ValueError("scaling_factor must be non-zero")

  @property
  def downsample_factor(self) -> int:
    """Pixels per latent along each side."""
    return 2**(len(self.block_out_channels) - 1)

  @property
  def shift(self) -> float:
    """``shift_factor``, with null meaning no shift."""
    return 0.0 if self.shift_factor is None else float(self.shift_factor)

  @classmethod
  def from_dict(cls, values: dict) -> AutoencoderKLConfig:
    return dataclass_from_mapping(cls, values)

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> AutoencoderKLConfig:
    return cls.from_dict(read_json(path))


class AutoencoderKL(nnx.Module):
  """Encoder and decoder of the KL-regularised VAE, with the 1x1 (post-)quantisation convs."""

  def __init__(self, config: AutoencoderKLConfig, *, rngs,
               precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST):
    self.config = config
    tower = {"block_out_channels": config.block_out_channels,
             "layers_per_block": config.layers_per_block, "groups": config.norm_num_groups,
             "mid_attention": config.mid_block_add_attention, "rngs": rngs,
             "precision": precision}
    latent = config.latent_channels
    self.encoder = Encoder(config.in_channels, latent, **tower)
    self.decoder = Decoder(latent, config.out_channels, **tower)
    self.quant_conv = (conv(2 * latent, 2 * latent, 1, rngs=rngs, precision=precision)
                       if config.use_quant_conv else None)
    self.post_quant_conv = (conv(latent, latent, 1, rngs=rngs, precision=precision)
                            if config.use_post_quant_conv else None)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, H, W, in_channels) images in [-1, 1] -> (mean, logvar) of the unscaled latents.

    Both are (B, H/f, W/f, latent_channels); logvar is clipped to [-30, 20].
    """
    moments = self.encoder(images)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def scale_latents(self, z: jax.Array) -> jax.Array:
    """Unscaled VAE latents -> the diffusion model's latents."""
    return (z - self.config.shift) * self.config.scaling_factor

  def unscale_latents(self, latents: jax.Array) -> jax.Array:
    """The diffusion model's latents -> unscaled VAE latents (inverse of ``scale_latents``)."""
    return latents / self.config.scaling_factor + self.config.shift

  def latents_from_images(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """(B, H, W, 3) images in [-1, 1] -> scaled (B, H/f, W/f, latent_channels) latents.

    Without ``rng`` the posterior mean (deterministic, what one caches for a dataset); with a
    PRNG key, a sample from the posterior.
    """
    mean, logvar = self.encode(images)
    z = mean
    if rng is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return self.scale_latents(z)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Scaled (B, h, w, latent_channels) latents -> (B, h*f, w*f, out_channels) images.

    Outputs are roughly in [-1, 1] but not clipped.
    """
    z = self.unscale_latents(latents)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)


def _stored_key(key: str, reader: CheckpointReader) -> str:
  """The checkpoint key holding parameter ``key``, which may use the legacy attention names."""
  if key in reader:
    return key
  match = _ATTENTION_KEY.match(key)
  if match:
    prefix, name, leaf = match.groups()
    legacy = prefix + LEGACY_ATTENTION_NAMES[name] + leaf
    if legacy in reader:
      return legacy
  message = f"parameter {key} is missing from {reader.listing}"
  if any(stored.startswith(_LDM_PREFIXES) for stored in reader):
    message += ("; its keys follow the original latent-diffusion layout (encoder.down.N.block...), "
                "which must be converted to the diffusers layout first")
  raise KeyError(message)


def load_vae(model_dir: str | os.PathLike, *,
             precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST) -> AutoencoderKL:
  """An ``AutoencoderKL`` from a diffusers VAE directory (config.json + weights).

  The directory is the ``vae`` folder of a pipeline, or a standalone VAE. The weights are
  safetensors (possibly sharded); PyTorch ``.bin`` files are refused, naming
  ``encoders/convert_torch.py``. Weights are cast to float32. Keys the model does not use are
  ignored; a missing key or one of the wrong shape raises, naming the key and the file.
  """
  model_dir = os.fspath(model_dir)
  config = AutoencoderKLConfig.from_json_file(config_file(model_dir, "VAE"))
  # Built abstractly: nothing is initialised only to be overwritten.
  abstract = nnx.eval_shape(
      lambda: AutoencoderKL(config, rngs=ParamKeys(0), precision=precision))
  with contextlib.closing(
      open_checkpoint(model_dir, WEIGHT_FILE_NAMES, BIN_WEIGHT_FILE_NAMES)) as reader:
    return load_parameters(abstract, reader, stored_key=lambda key: _stored_key(key, reader))

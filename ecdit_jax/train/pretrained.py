"""The frozen pretrained networks of a run: ``config.pretrained`` checked, loaded and overridden.

``config.pretrained`` names Hugging Face format directories: ``text_encoder`` (T5 or CLIP, used
when ``config.model.text_encoder`` is not "scratch"), ``vae`` (the diffusers VAE that turns the
latents a latent-space model samples into images) and ``dtype``, the compute dtype of both.
Neither network is trained or checkpointed; a run's config.json records where they were, and
inference can point at another place (``overrides``) when the weights have moved.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ecdit_jax.model import ConfigError, ModelConfig
from ecdit_jax.parallel import mesh as mesh_lib
from ecdit_jax.train import input_pipeline
from ecdit_jax.train.text_conditioning import (
  FrozenTextEncoder,
  load_frozen_text_encoder,
  place,
  to_host,
)

PRETRAINED_DEFAULTS = {"text_encoder": "", "vae": "", "dtype": "bfloat16"}


def settings(config: ml_collections.ConfigDict,
             overrides: Mapping[str, str] | None = None) -> dict[str, str]:
  """``config.pretrained`` as a dict (defaults for runs made before it existed), with the
  non-empty ``overrides`` (keys text_encoder, vae, dtype) replacing its values."""
  values = dict(PRETRAINED_DEFAULTS)
  block = config.get("pretrained")
  if block is not None:
    values.update({k: v for k, v in dict(block).items() if k in values})
  unknown = sorted(set(overrides or {}) - set(values))
  if unknown:
    raise ValueError(f"unknown pretrained override(s) {unknown}; known: {sorted(values)}")
  values.update({k: v for k, v in (overrides or {}).items() if v})
  return values


def check_config(config: ml_collections.ConfigDict, model_config: ModelConfig) -> None:
  """Checks that need no file: each error names the config key to set."""
  pretrained = settings(config)
  if model_config.has_pretrained_text_encoder and not pretrained["text_encoder"]:
    raise ConfigError(
        f"config.model.text_encoder={model_config.text_encoder!r} needs the weights: set "
        f"config.pretrained.text_encoder to a Hugging Face {model_config.text_encoder.upper()} "
        "directory")
  try:
    ok = jnp.issubdtype(jnp.dtype(pretrained["dtype"]), jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    raise ConfigError(f"config.pretrained.dtype={pretrained['dtype']!r} must name a floating "
                      "dtype, e.g. 'bfloat16'")
  on_latents = input_pipeline.model_on_latents(config)
  if pretrained["vae"] and not on_latents:
    raise ConfigError(f"config.pretrained.vae={pretrained['vae']!r} is for a model on latents, "
                      f"but config.data.dataset={config.data.dataset!r} is not latents:DIR and "
                      "config.data.vae_encode is off; leave it empty or set one of them")
  if config.data.get("vae_encode", False):
    if input_pipeline.latent_dir(config) is not None:
      raise ConfigError("config.data.vae_encode encodes images, but config.data.dataset="
                        f"{config.data.dataset!r} holds latents already; turn it off")
    if not pretrained["vae"]:
      raise ConfigError("config.data.vae_encode needs the VAE: set config.pretrained.vae to a "
                        "diffusers VAE directory")
  if on_latents and not pretrained["vae"]:
    for key in ("sample_every_steps", "eval_every_steps"):
      if config.get(key):
        raise ConfigError(
            f"config.{key}={config[key]} makes images, and a model trained on latents needs "
            f"the VAE for that: set config.pretrained.vae to a diffusers VAE directory or "
            f"config.{key}=0")


@dataclasses.dataclass
class FrozenVae:
  """A diffusers VAE split into graphdef + parameters (in ``dtype``), for decoding samples."""

  weights_dir: str
  graphdef: nnx.GraphDef
  params: Any
  downsample_factor: int  # pixels per latent along each side
  dtype: Any

  def decode(self, params, latents: jax.Array) -> jax.Array:
    """Scaled latents (B, h, w, C) -> float32 images (B, h f, w f, 3), nominally in [-1, 1]."""
    vae = nnx.merge(self.graphdef, params)
    return vae.decode(latents.astype(self.dtype)).astype(jnp.float32)

  def encode(self, params, images: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] -> float32 scaled latents (B, H/f, W/f, C): the
    posterior mean, as ``ecdit_jax.precompute`` writes by default."""
    vae = nnx.merge(self.graphdef, params)
    return vae.latents_from_images(images.astype(self.dtype)).astype(jnp.float32)

  def placed(self, mesh: Mesh | None) -> FrozenVae:
    """A copy with the parameters on the devices (see ``text_conditioning.place``)."""
    return dataclasses.replace(self, params=place(self.params, mesh))


def make_image_encoder(vae: FrozenVae, mesh: Mesh):
  """batch -> batch with its pixel ``image`` replaced by the VAE's latents, jitted with the
  images and latents split over the batch axes like the train batch; ``vae`` must be placed
  (replicated) on ``mesh``."""
  whole = NamedSharding(mesh, PartitionSpec())
  rows = mesh_lib.batch_sharding(mesh, 4)
  encode = jax.jit(vae.encode, in_shardings=(whole, rows), out_shardings=rows)

  def encode_batch(batch: dict) -> dict:
    return {**batch, "image": encode(vae.params, batch["image"])}

  return encode_batch


def load_frozen_vae(weights_dir: str, dtype: str, model_config: ModelConfig) -> FrozenVae:
  """The VAE of ``weights_dir``; its latent channels must be ``config.model.in_channels``.

  Parameters are cast to ``dtype`` and kept on the host until ``placed``."""
  from ecdit_jax.encoders import vae as vae_lib

  if not os.path.isdir(weights_dir):
    raise ConfigError(f"config.pretrained.vae={weights_dir!r} is not a directory")
  vae = vae_lib.load_vae(weights_dir)
  if vae.config.latent_channels != model_config.in_channels:
    raise ConfigError(f"config.model.in_channels={model_config.in_channels} must equal the "
                      f"{vae.config.latent_channels} latent channels of the VAE in {weights_dir}")
  graphdef, params = nnx.split(vae)
  return FrozenVae(weights_dir=weights_dir, graphdef=graphdef, params=to_host(params, dtype),
                   downsample_factor=vae.config.downsample_factor, dtype=jnp.dtype(dtype))


def load_text_encoder(config: ml_collections.ConfigDict, model_config: ModelConfig,
                      overrides: Mapping[str, str] | None = None) -> FrozenTextEncoder | None:
  """The run's frozen text encoder, or None when it trains its own."""
  if not model_config.has_pretrained_text_encoder:
    return None
  pretrained = settings(config, overrides)
  if not pretrained["text_encoder"]:
    raise ConfigError(f"config.model.text_encoder={model_config.text_encoder!r} needs "
                      "config.pretrained.text_encoder (the weights directory)")
  return load_frozen_text_encoder(model_config.text_encoder, pretrained["text_encoder"],
                                  pretrained["dtype"], model_config)


def load_vae(config: ml_collections.ConfigDict, model_config: ModelConfig,
             overrides: Mapping[str, str] | None = None) -> FrozenVae | None:
  """The VAE of a model on latents (decoding samples; encoding images with
  ``config.data.vae_encode``); None for pixel models or when none is named."""
  pretrained = settings(config, overrides)
  if not input_pipeline.model_on_latents(config) or not pretrained["vae"]:
    return None
  return load_frozen_vae(pretrained["vae"], pretrained["dtype"], model_config)

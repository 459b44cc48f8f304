"""Jitted sampling from a train state's parameters, and PNG output (files and grids)."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image, ImageDraw

from ecdit_jax.diffusion.generate import generate
from ecdit_jax.model import ModelConfig


def make_sampler(graphdef: nnx.GraphDef, model_config: ModelConfig, *, num_steps: int,
                 cfg_scale: float, method: str, capacity_factor: float | None = None,
                 param_shardings=None, mesh=None, text_encoder=None, vae=None):
  """sampler(params, tokens, null_tokens, seed, first_index) -> (B, H, W, C) float32.

  Image ``first_index + i`` of a run is drawn from noise keyed by (seed, first_index + i), so a
  prompt's image does not depend on how prompts are batched. With ``param_shardings`` and
  ``mesh`` (training on a mesh) the parameters stay in their shards, prompts and images are
  replicated; call the sampler inside ``jax.set_mesh(mesh)``.

  ``text_encoder`` (a ``text_conditioning.FrozenTextEncoder``) encodes the prompts for a model
  without its own text encoder; ``vae`` (a ``pretrained.FrozenVae``) decodes the sampled latents
  of a latent-space model, and the sampler then returns images (B, h f, w f, 3) nominally in
  [-1, 1]. Both networks' parameters are arguments of the jitted function, not constants of
  it, and replicated on the mesh (pass them already placed there).
  """
  shape = (model_config.image_size, model_config.image_size, model_config.in_channels)
  jit_kwargs = {}
  if mesh is not None:
    whole = NamedSharding(mesh, PartitionSpec())
    jit_kwargs = dict(in_shardings=(param_shardings, whole, whole, whole, whole, whole, whole),
                      out_shardings=whole)

  @functools.partial(jax.jit, **jit_kwargs)
  def run(params, text_params, vae_params, tokens, null_tokens, seed, indices):
    model = nnx.merge(graphdef, params)
    seed_key = jax.random.key(seed)
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(seed_key, i), shape))(
        indices)
    encode_text = None
    if text_encoder is not None:
      encode_text = functools.partial(text_encoder.encode, text_params)
    samples = generate(model, tokens, null_tokens, noise, num_steps=num_steps,
                       cfg_scale=cfg_scale, method=method, capacity_factor=capacity_factor,
                       encode_text=encode_text)
    return samples if vae is None else vae.decode(vae_params, samples)

  text_params = None if text_encoder is None else text_encoder.params
  vae_params = None if vae is None else vae.params

  def sampler(params, tokens, null_tokens, seed: int, first_index: int = 0):
    # Host (numpy) inputs: valid in every process of a multi-process run.
    indices = np.arange(first_index, first_index + len(tokens), dtype=np.int32)
    return run(params, text_params, vae_params, np.asarray(tokens), np.asarray(null_tokens),
               np.uint32(seed), indices)

  # The jitted function itself, run(params, text_params, vae_params, tokens, null_tokens, seed,
  # indices): for benchmarks that lower and compile it on their own.
  sampler.jitted = run
  return sampler


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 pixels."""
  return np.asarray(np.clip((np.asarray(images) + 1.0) * 127.5 + 0.5, 0, 255), np.uint8)


def write_pngs(images: np.ndarray, outdir: str, first_index: int = 0) -> list[str]:
  os.makedirs(outdir, exist_ok=True)
  paths = []
  for offset, image in enumerate(images):
    path = os.path.join(outdir, f"{first_index + offset:05d}.png")
    Image.fromarray(image).save(path)
    paths.append(path)
  return paths


def sample_grid(images: np.ndarray, prompts: Sequence[str], *, columns: int = 4,
                scale: int = 4) -> np.ndarray:
  """Images enlarged ``scale``x (nearest) with their prompt written under each."""
  n, h, w, _ = images.shape
  cell_w, caption_h = w * scale, 24
  cell_h = h * scale + caption_h
  rows = -(-n // columns)
  canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, (image, prompt) in enumerate(zip(images, prompts)):
    x, y = (i % columns) * cell_w, (i // columns) * cell_h
    tile = Image.fromarray(image).resize((cell_w, h * scale), Image.NEAREST)
    canvas.paste(tile, (x, y))
    draw.text((x + 2, y + h * scale + 2), _fit(prompt, cell_w), fill=(0, 0, 0))
  return np.asarray(canvas)


def _fit(text: str, width_px: int, char_px: int = 6) -> str:
  """Wraps a caption onto two lines of the cell's width (the default font is ~6 px wide)."""
  per_line = max(width_px // char_px, 4)
  return text[:per_line] + ("\n" + text[per_line:2 * per_line] if len(text) > per_line else "")

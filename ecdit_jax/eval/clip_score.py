"""CLIP score: text-image alignment of generated images with their captions.

For each (image, caption) pair the score is ``100 * max(cos(E_image, E_text), 0)`` with E the
CLIP embeddings, and the reported value is its mean over the pairs. This is the torchmetrics
convention (``torchmetrics.multimodal.CLIPScore``). Hessel et al. (2021) define CLIP-S as
``2.5 * max(cos, 0)``: the same quantity rescaled, so divide by 40 to compare with their numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ecdit_jax.encoders.clip import ClipModel, preprocess_images
from ecdit_jax.encoders.clip_tokenizer import ClipTokenizer


@functools.partial(jax.jit, static_argnums=0)
def _pair_cosines(graphdef, state, pixel_values, input_ids, attention_mask):
  """Cosine similarity of each image with its caption, (B,)."""
  model = nnx.merge(graphdef, state)
  image = model.encode_image(pixel_values)
  text = model.encode_text(input_ids, attention_mask)
  image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
  text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
  return jnp.sum(image * text, axis=-1)


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  """Repeats the last row up to ``rows``, so that every batch has one shape and compiles once."""
  missing = rows - len(array)
  if missing <= 0:
    return array
  return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)])


def clip_score(model: ClipModel, tokenizer: ClipTokenizer,
               images_uint8: np.ndarray | Sequence[np.ndarray], captions: Sequence[str],
               batch_size: int = 32) -> dict:
  """CLIP score of ``images_uint8[i]`` against ``captions[i]``.

  Images are uint8 (H, W, 3), as an array (N, H, W, 3) or a list of differently sized ones; they
  are resized and centre-cropped to the model's input size (``preprocess_images``). Captions are
  tokenized to the text tower's maximum length, longer ones truncated.

  Returns ``{"mean": float, "per_image": (N,) float32}`` with
  ``per_image[i] = 100 * max(cos(image_i, caption_i), 0)`` (torchmetrics' convention, see the
  module docstring) and ``mean`` its average.
  """
  if len(images_uint8) != len(captions):
    raise ValueError(f"{len(images_uint8)} images but {len(captions)} captions")
  if not len(captions):
    raise ValueError("clip_score needs at least one image")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  image_size = model.config.vision.image_size
  max_length = model.config.text.max_position_embeddings
  graphdef, state = nnx.split(model)
  rows = min(batch_size, len(captions))
  cosines = []
  for start in range(0, len(captions), batch_size):
    stop = min(start + batch_size, len(captions))
    pixel_values = preprocess_images(images_uint8[start:stop], image_size)
    input_ids, attention_mask = tokenizer.encode_batch(list(captions[start:stop]), max_length)
    batch = [_pad_rows(x, rows) for x in (pixel_values, input_ids, attention_mask)]
    cosines.append(np.asarray(_pair_cosines(graphdef, state, *batch))[:stop - start])
  per_image = (100.0 * np.maximum(np.concatenate(cosines), 0.0)).astype(np.float32)
  return {"mean": float(per_image.mean()), "per_image": per_image}

"""MaskDiT-style token masking: which tokens each image keeps, and gathering them.

Training on a random subset of image tokens (MaskDiT; EC-DiT uses a mask ratio of 0.5) roughly
halves the transformer cost per step. Tokens are patches in the layout of
``ecdit_jax.model.layers.patchify``.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp


def num_kept_tokens(num_tokens: int, mask_ratio: float) -> int:
  """Number of tokens each image keeps: ``max(1, floor(num_tokens * (1 - mask_ratio)))``.

  ``mask_ratio`` is the fraction of tokens dropped and must satisfy
  ``0 <= mask_ratio < 1``; ratio 0 keeps all tokens. Both arguments must be
  static Python numbers because the result defines array shapes.
  """
  if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral) or num_tokens < 1:
    raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}")
  if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, numbers.Real):
    raise ValueError(f"mask_ratio must be a real number in [0, 1), got {mask_ratio!r}")
  if not (0.0 <= mask_ratio < 1.0):  # also rejects NaN
    raise ValueError(f"mask_ratio must satisfy 0 <= mask_ratio < 1, got {mask_ratio!r}")
  # The small epsilon stops float error (e.g. 10 * (1 - 0.7) = 2.9999...)
  # from flooring one token too few.
  kept = math.floor(num_tokens * (1.0 - float(mask_ratio)) + 1e-9)
  return int(min(num_tokens, max(1, kept)))


def random_keep_indices(rng, batch_size: int, num_tokens: int, mask_ratio: float) -> jax.Array:
  """Uniformly random token subsets, one per image, as int32 ``(batch_size, K)``.

  ``K = num_kept_tokens(num_tokens, mask_ratio)``. Each row is a uniformly
  random K-subset of ``range(num_tokens)`` drawn independently per image and
  sorted ascending, so kept tokens stay in raster order (positional
  embeddings and any locality in attention are preserved). With ratio 0 every
  row is ``0, 1, ..., num_tokens - 1``.
  """
  num_keep = num_kept_tokens(num_tokens, mask_ratio)
  if num_keep == num_tokens:
    return jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch_size, num_tokens))
  # The K largest of i.i.d. uniform scores form a uniformly random K-subset;
  # top_k avoids a full sort of all N scores.
  scores = jax.random.uniform(rng, (batch_size, num_tokens))
  _, chosen = jax.lax.top_k(scores, num_keep)
  return jnp.sort(chosen, axis=-1).astype(jnp.int32)


def gather_tokens(x: jax.Array, keep_idx: jax.Array) -> jax.Array:
  """Selects kept tokens: ``x`` ``(B, N, ...)`` and ``keep_idx`` ``(B, K)`` give ``(B, K, ...)``.

  ``out[b, k] = x[b, keep_idx[b, k]]``.
  """
  return jax.vmap(lambda row, idx: jnp.take(row, idx, axis=0))(x, keep_idx)

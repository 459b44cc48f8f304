"""Rectified-flow (flow-matching) training utilities.

Convention used throughout the package:

* ``t`` lies in ``[0, 1]``; ``t = 0`` is data and ``t = 1`` is pure Gaussian noise.
* The noised sample is the straight-line interpolation
  ``x_t = (1 - t) * x_0 + t * noise``.
* The network predicts the velocity ``v = noise - x_0``, which is ``dx_t/dt``.
  Integrating ``dx/dt = v`` from ``t = 1`` down to ``t = 0`` therefore turns
  noise into data (see :mod:`ecdit_jax.diffusion.samplers`).

All functions are pure and jit-friendly; randomness comes only from the
explicit ``rng`` keys the caller passes in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
  "sample_timesteps",
  "add_noise",
  "velocity_target",
  "flow_matching_loss",
  "caption_drop_mask",
  "drop_captions",
  "drop_context",
]


def sample_timesteps(
  rng, batch_size: int, *, loc: float = 0.0, scale: float = 1.0, dtype=jnp.float32
) -> jax.Array:
  """Draws ``(batch_size,)`` training times from a logit-normal distribution.

  ``t = sigmoid(loc + scale * z)`` with ``z ~ N(0, 1)``, so ``logit(t)`` has
  mean ``loc`` and standard deviation ``scale``. The logit-normal puts most
  mass at intermediate noise levels, where the velocity is hardest to learn.
  """
  # Draw in float32 even for low-precision dtypes so the tails are not
  # quantised before the sigmoid squashes them.
  standard_normal = jax.random.normal(rng, (batch_size,), dtype=jnp.float32)
  return jax.nn.sigmoid(loc + scale * standard_normal).astype(dtype)


def _broadcast_time(t, reference: jax.Array) -> jax.Array:
  """Reshapes per-example times ``(B,)`` to ``(B, 1, ..., 1)`` to match ``reference``."""
  t = jnp.asarray(t, dtype=reference.dtype)
  if t.ndim == 0:
    return t
  return t.reshape(t.shape + (1,) * (reference.ndim - t.ndim))


def add_noise(x0: jax.Array, noise: jax.Array, t) -> jax.Array:
  """Returns ``x_t = (1 - t) * x0 + t * noise``.

  ``t`` is a scalar or a ``(B,)`` array broadcast over all non-batch axes of
  ``x0``. The result has the dtype of ``x0``.
  """
  t = _broadcast_time(t, x0)
  return (1 - t) * x0 + t * noise.astype(x0.dtype)


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """Returns the rectified-flow regression target ``v = noise - x0`` (= ``dx_t/dt``)."""
  return noise.astype(x0.dtype) - x0


def flow_matching_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error between predicted and target velocities, as a float32 scalar."""
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def caption_drop_mask(rng, batch_size: int, drop_prob: float) -> jax.Array:
  """Boolean ``(batch_size,)`` mask: ``True`` where the caption is replaced by the null text.

  Exposed separately so a caller can drop related per-caption arrays (e.g. an
  attention mask) consistently by reusing the same ``rng``.
  """
  # bernoulli compares a [0, 1) uniform against drop_prob, so drop_prob = 0
  # never drops and drop_prob = 1 always drops.
  return jax.random.bernoulli(rng, drop_prob, (batch_size,))


def drop_captions(rng, tokens: jax.Array, null_tokens: jax.Array, drop_prob: float) -> jax.Array:
  """Classifier-free-guidance caption dropout.

  Independently for each example, with probability ``drop_prob`` the whole
  row ``tokens[b]`` is replaced by ``null_tokens`` (the encoding of the empty
  caption); otherwise the row is returned unchanged.

  ``tokens`` has shape ``(B, L, ...)`` (token ids ``(B, L)`` or text
  embeddings ``(B, L, D)``) and ``null_tokens`` has shape ``tokens.shape[1:]``.
  """
  null_tokens = jnp.asarray(null_tokens, dtype=tokens.dtype)
  if null_tokens.shape != tokens.shape[1:]:
    raise ValueError(
      f"null_tokens shape {null_tokens.shape} must equal tokens.shape[1:] = {tokens.shape[1:]}"
    )
  drop = caption_drop_mask(rng, tokens.shape[0], drop_prob)
  drop = drop.reshape((tokens.shape[0],) + (1,) * (tokens.ndim - 1))
  return jnp.where(drop, null_tokens[None], tokens)


def drop_context(
  rng, context: jax.Array, lengths: jax.Array, null_context: jax.Array, null_length,
  drop_prob: float
) -> tuple[jax.Array, jax.Array]:
  """Caption dropout for text that is already encoded (a frozen encoder outside the model).

  Row ``b`` of ``context`` (B, L, D) and of ``lengths`` (B,) becomes ``null_context`` (L, D)
  and ``null_length`` (the empty caption through the same encoder) with probability
  ``drop_prob``. The rows dropped for a given ``rng`` are those ``drop_captions`` drops, so
  dropping tokens before a row-wise encoder and dropping its outputs agree.
  """
  null_context = jnp.asarray(null_context, dtype=context.dtype)
  if null_context.shape != context.shape[1:]:
    raise ValueError(
      f"null_context shape {null_context.shape} must equal context.shape[1:] = {context.shape[1:]}"
    )
  drop = caption_drop_mask(rng, context.shape[0], drop_prob)
  context = jnp.where(drop[:, None, None], null_context[None], context)
  lengths = jnp.where(drop, jnp.asarray(null_length, lengths.dtype), lengths)
  return context, lengths

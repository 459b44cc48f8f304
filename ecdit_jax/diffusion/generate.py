"""Text-to-image generation: prompts' tokens + noise -> images, with classifier-free guidance.

The prompt and the null text are encoded once; every ODE step then runs the DiT on the
conditional and unconditional halves in one batch. Routing is per image (by default), so an
image depends only on its own prompt and noise, never on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ecdit_jax.diffusion.samplers import cfg_velocity_fn, sample


def generate(
  model,
  tokens: jax.Array,
  null_tokens: jax.Array,
  noise: jax.Array,
  *,
  num_steps: int,
  cfg_scale: float,
  method: str = "euler",
  shift: float = 1.0,
  capacity_factor: float | None = None,
  encode_text: Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None = None,
) -> jax.Array:
  """Integrates the model's velocity from noise (t=1) to an image (t=0).

  Args:
    model: a TextToImageDiT (``encode_text`` and ``dit``).
    tokens: (B, L) prompt tokens; null_tokens: (L,) the empty caption's tokens.
    noise: (B, H, W, C) starting noise (draw it per image from a seed for reproducibility).
    capacity_factor: expert-choice capacity at inference; None uses the config's eval value.
    encode_text: tokens (B, L) -> (context (B, L, width), lengths (B,)); default
      ``model.encode_text``. A frozen pretrained encoder outside the model goes here.
  Returns:
    (B, H, W, C) float32 samples, nominally in [-1, 1].
  """
  encode_text = model.encode_text if encode_text is None else encode_text
  context, lengths = encode_text(tokens)
  null = jnp.broadcast_to(null_tokens, tokens.shape)
  null_context, null_lengths = encode_text(null)

  def model_fn(x, t, cond):
    ctx, ctx_lengths = cond
    velocity, _ = model.dit(x, t, ctx, ctx_lengths, train=False, capacity_factor=capacity_factor)
    return velocity

  velocity_fn = cfg_velocity_fn(
    model_fn, (context, lengths), (null_context, null_lengths), cfg_scale
  )
  return sample(velocity_fn, noise.astype(jnp.float32), num_steps, method=method, shift=shift)


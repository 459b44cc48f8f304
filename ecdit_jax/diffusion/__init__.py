"""Rectified-flow diffusion: training targets and losses, token masking, and ODE samplers.

Convention: ``t = 0`` is data, ``t = 1`` is noise, ``x_t = (1 - t) x_0 + t noise``
and the model predicts the velocity ``noise - x_0``.
"""

from ecdit_jax.diffusion.masking import (
  gather_tokens,
  keep_mask,
  num_kept_tokens,
  patchify,
  random_keep_indices,
  scatter_tokens,
  unpatchify,
)
from ecdit_jax.diffusion.rectified_flow import (
  add_noise,
  caption_drop_mask,
  drop_captions,
  drop_context,
  flow_matching_loss,
  sample_timesteps,
  velocity_target,
)
from ecdit_jax.diffusion.samplers import (
  cfg_velocity_fn,
  euler_sample,
  heun_sample,
  sample,
  sampling_timesteps,
  shift_timesteps,
)

__all__ = [
  "add_noise",
  "caption_drop_mask",
  "cfg_velocity_fn",
  "drop_captions",
  "drop_context",
  "euler_sample",
  "flow_matching_loss",
  "gather_tokens",
  "heun_sample",
  "keep_mask",
  "num_kept_tokens",
  "patchify",
  "random_keep_indices",
  "sample",
  "sample_timesteps",
  "sampling_timesteps",
  "scatter_tokens",
  "shift_timesteps",
  "unpatchify",
  "velocity_target",
]

"""The optimiser: RMSProp with momentum (as in the paper), linear warmup, clipping, decay."""

from __future__ import annotations

import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then constant."""
  return optax.join_schedules(
      [optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1)),
       optax.constant_schedule(config.learning_rate)],
      boundaries=[config.warmup_steps])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip -> RMS scaling -> (decoupled weight decay) -> learning rate -> momentum.

  This is ``optax.rmsprop`` (momentum applied after the learning rate, as in TensorFlow's
  RMSProp that the paper's TPU code would use) with weight decay slotted in before the learning
  rate so that it is scaled by the same warmup schedule.
  """
  parts = []
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.scale_by_rms(decay=config.rmsprop_decay, eps=config.rmsprop_eps))
  if config.weight_decay:
    parts.append(optax.add_decayed_weights(config.weight_decay))
  parts.append(optax.scale_by_learning_rate(learning_rate_schedule(config)))
  if config.momentum:
    parts.append(optax.trace(decay=config.momentum))
  return optax.chain(*parts)

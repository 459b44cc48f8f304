"""The optimiser: RMSProp with momentum (as in the paper), linear warmup, clipping, decay."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from ecdit_jax.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then ``lr_decay``:
  constant ("none", the paper's long runs), or a cosine or linear decay to 0 at
  ``num_train_steps`` (for runs of a fixed budget; extending such a run changes the schedule)."""
  lr, warmup = cfg.learning_rate, cfg.warmup_steps
  after = optax.constant_schedule(lr)
  decay_steps = max(cfg.num_train_steps - warmup, 1)
  if cfg.lr_decay == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps)
  elif cfg.lr_decay == "linear":
    after = optax.linear_schedule(lr, 0.0, decay_steps)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(warmup, 1)), after], boundaries=[warmup])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """clip -> RMS scaling -> (decoupled weight decay) -> learning rate -> momentum.

  This is ``optax.rmsprop`` (momentum applied after the learning rate, as in TensorFlow's
  RMSProp that the paper's TPU code would use) with weight decay slotted in before the learning
  rate so that it is scaled by the same warmup schedule. ``momentum_dtype`` bfloat16 halves
  the momentum trace's share of the update's memory traffic.
  """
  parts = []
  if cfg.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  parts.append(optax.scale_by_rms(decay=cfg.rmsprop_decay, eps=cfg.rmsprop_eps))
  if cfg.weight_decay:
    parts.append(optax.add_decayed_weights(cfg.weight_decay))
  parts.append(optax.scale_by_learning_rate(learning_rate_schedule(cfg)))
  if cfg.momentum:
    parts.append(optax.trace(decay=cfg.momentum, accumulator_dtype=jnp.dtype(cfg.momentum_dtype)))
  return optax.chain(*parts)

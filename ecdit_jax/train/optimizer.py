"""The optimiser: RMSProp with momentum (as in the paper), linear warmup, clipping, decay."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


LR_DECAYS = ("none", "cosine", "linear")
MOMENTUM_DTYPES = ("float32", "bfloat16")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then ``config.lr_decay``:
  constant ("none", the paper's long runs), or a cosine or linear decay to 0 at
  ``num_train_steps`` (for runs of a fixed budget; extending such a run changes the schedule)."""
  decay = config.get("lr_decay", "none")
  if decay not in LR_DECAYS:
    raise ValueError(f"config.lr_decay={decay!r} must be one of {LR_DECAYS}")
  lr, warmup = config.learning_rate, config.warmup_steps
  after = optax.constant_schedule(lr)
  decay_steps = max(config.num_train_steps - warmup, 1)
  if decay == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps)
  elif decay == "linear":
    after = optax.linear_schedule(lr, 0.0, decay_steps)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(warmup, 1)), after], boundaries=[warmup])


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
    # A bfloat16 trace halves the momentum's share of the update's memory traffic, which is
    # per parameter and so weighs most on MoE models at small batches (bench/NOTES.md).
    dtype = config.get("momentum_dtype", "float32")
    if dtype not in MOMENTUM_DTYPES:
      raise ValueError(f"config.momentum_dtype={dtype!r} must be one of {MOMENTUM_DTYPES}")
    parts.append(optax.trace(decay=config.momentum, accumulator_dtype=jnp.dtype(dtype)))
  return optax.chain(*parts)

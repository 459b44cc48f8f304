"""The jitted training step: a pure function of (train state, batch).

One step draws timesteps, noise, caption dropout and token masks from the state's RNG, computes
the rectified-flow velocity loss (plus any router auxiliary loss), accumulates gradients over
micro-batches, applies RMSProp-momentum, and updates the EMA. A step whose loss or gradient is
not finite leaves parameters, EMA and optimizer state untouched (the host decides whether to
stop or go on).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ecdit_jax.config import TrainConfig
from ecdit_jax.data import batch as batch_keys
from ecdit_jax.diffusion import masking, rectified_flow
from ecdit_jax.model.layer_stacking import params_for_compute
from ecdit_jax.model.layers import patchify
from ecdit_jax.parallel import mesh as mesh_lib
from ecdit_jax.train.optimizer import learning_rate_schedule
from ecdit_jax.train.state import TrainState

Batch = dict[str, jax.Array]


def ema_decay_at(step: jax.Array, max_decay: float) -> jax.Array:
  """EMA decay that ramps up early so the average does not linger on the random init."""
  step = step.astype(jnp.float32)
  return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))


def _on_devices_after(grads, *trees):
  """``trees`` in device memory, for use once ``grads`` exist. State kept in host memory
  between steps (config.host_offload) is moved straight from the step's arguments, as XLA's
  host offloading expects, and a barrier holds its uses back until the gradients are done.
  Trees wholly on the devices are returned as they are."""
  if not any(mesh_lib.in_host_memory(x) for x in jax.tree.leaves(trees)):
    return trees
  return jax.lax.optimization_barrier((grads, mesh_lib.to_device_memory(trees)))[1]


def _where_it_was(new, old):
  """``new`` with each leaf in the memory ``old``'s leaf came from: the step returns its state as
  it took it (a scan over steps carries it unchanged)."""
  return jax.tree.map(lambda n, o: jax.device_put(n, jax.memory.Space.Host)
                      if mesh_lib.in_host_memory(o) else n, new, old)


def make_loss_fn(graphdef: nnx.GraphDef, cfg: TrainConfig, null_tokens: jax.Array | None,
                 masked: bool, null_context: tuple[jax.Array, jax.Array] | None = None):
  """loss_fn(params, batch, rng) -> (total loss, (velocity loss, aux)).

  The batch holds the text in one of two forms, chosen when tracing: ``tokens`` (B, L) for the
  model's own text encoder, dropped to ``null_tokens``; or ``context`` (B, L, width) with
  ``context_lengths`` (B,), encoded beforehand by a frozen encoder, dropped to ``null_context``
  = (the empty caption's context (L, width), its length).
  """
  dcfg, model_config = cfg.diffusion, cfg.model

  def loss_fn(params, batch: Batch, rng: jax.Array):
    model = nnx.merge(graphdef, params)
    x0 = batch[batch_keys.IMAGE]
    batch_size = x0.shape[0]
    k_time, k_noise, k_drop, k_mask = jax.random.split(rng, 4)
    t = rectified_flow.sample_timesteps(k_time, batch_size, loc=dcfg.timestep_loc,
                                        scale=dcfg.timestep_scale)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = rectified_flow.add_noise(x0, noise, t)
    target = rectified_flow.velocity_target(x0, noise)
    if batch_keys.CONTEXT in batch:
      if null_context is None:
        raise ValueError("a batch of encoded text (context) needs null_context")
      context, lengths = rectified_flow.drop_context(
          k_drop, batch[batch_keys.CONTEXT], batch[batch_keys.CONTEXT_LENGTHS], *null_context,
          dcfg.caption_dropout)
      forward = lambda **kwargs: model.from_context(x_t, t, context, lengths, **kwargs)
    else:
      tokens = rectified_flow.drop_captions(k_drop, batch[batch_keys.TOKENS], null_tokens,
                                            dcfg.caption_dropout)
      forward = lambda **kwargs: model(x_t, t, tokens, **kwargs)
    if masked:
      keep = masking.random_keep_indices(k_mask, batch_size, model_config.num_tokens,
                                         dcfg.mask_ratio)
      pred, aux = forward(keep_index=keep, train=True)
      target = masking.gather_tokens(patchify(target, model_config.patch_size), keep)
    else:
      pred, aux = forward(train=True)
    loss = rectified_flow.flow_matching_loss(pred, target)
    aux = {k: v for k, v in aux.items() if k != "token_counts"}  # per-token maps: analysis only
    return loss + aux["aux_loss"], (loss, aux)

  return loss_fn


def make_train_step(graphdef: nnx.GraphDef, cfg: TrainConfig,
                    optimizer: optax.GradientTransformation, null_tokens: jax.Array | None, *,
                    masked: bool,
                    null_context: tuple[jax.Array, jax.Array] | None = None) -> Callable:
  """Returns train_step(state, batch) -> (state, metrics), not yet jitted.

  ``batch`` holds tokens or encoded context (see ``make_loss_fn``)."""
  loss_fn = make_loss_fn(graphdef, cfg, null_tokens, masked, null_context)
  grad_fn = jax.grad(loss_fn, has_aux=True)
  accum = cfg.grad_accum_steps
  schedule = learning_rate_schedule(cfg)

  def train_step(state: TrainState, batch: Batch):
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    batch_size = batch[batch_keys.IMAGE].shape[0]
    if batch_size % accum:
      raise ValueError(f"batch of {batch_size} is not divisible by "
                       f"config.grad_accum_steps={accum}")
    # Micro-batch i takes rows i, i + accum, ...: with the batch split over devices, every
    # device then holds an equal share of every micro-batch and nothing moves between them.
    micro = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(batch_size // accum, accum, *x.shape[1:]), 0, 1), batch)

    # With cfg.cast_weights_once and several micro-batches, they differentiate the weights as
    # the model computes with them (params_for_compute), cast before the loop: same gradients,
    # cast back to the parameters' dtype as they are summed.
    params = (params_for_compute(state.params, cfg.model.compute_dtype)
              if cfg.cast_weights_once and accum > 1 else state.params)

    def accumulate(grad_sum, inputs):
      index, micro_batch = inputs
      weights = params
      if cfg.gather_weights_per_micro_batch:
        # Tied to the micro-batch by the barrier, the weights (and so their all-gathers) vary
        # with the loop: XLA cannot hoist the gathers out of it and hold every weight whole.
        weights, micro_batch = jax.lax.optimization_barrier((params, micro_batch))
      grads, (loss, aux) = grad_fn(weights, micro_batch, jax.random.fold_in(step_rng, index))
      return jax.tree.map(lambda s, g: s + g.astype(s.dtype), grad_sum, grads), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grad_sum, (losses, auxes) = jax.lax.scan(accumulate, zeros, (jnp.arange(accum), micro))
    old_opt, old_ema = _on_devices_after(grad_sum, state.opt_state, state.ema_params)
    grads = jax.tree.map(lambda g: g / accum, grad_sum)
    loss = jnp.mean(losses)
    grad_norm = optax.tree_utils.tree_norm(grads)

    updates, opt_state = optimizer.update(grads, old_opt, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, cfg.ema_decay)
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, old_ema, params)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1,  # counts batches consumed, including skipped updates
        params=keep_new(params, state.params),
        ema_params=_where_it_was(keep_new(ema, old_ema), state.ema_params),
        opt_state=_where_it_was(keep_new(opt_state, old_opt), state.opt_state),
        rng=jax.random.key_data(rng))
    metrics = {
        "loss": loss,
        "aux_loss": jnp.mean(auxes["aux_loss"]),
        "grad_norm": grad_norm,
        "learning_rate": schedule(state.step),
        "nonfinite": ~finite,
        "moe": jax.tree.map(lambda x: jnp.mean(x, axis=0), auxes["moe"]),
    }
    return new_state, metrics

  return train_step

"""The train step: gradient accumulation is the mean of micro-batch gradients; EMA and the
optimizer are applied once per step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ecdit_jax.config import TrainConfig
from ecdit_jax.train.optimizer import make_optimizer
from ecdit_jax.train.state import create_train_state
from ecdit_jax.train.step import ema_decay_at, make_loss_fn, make_train_step
from tests.tiny import tiny_train_config


def _setup(batch_size, seed, **overrides):
  """A tiny model's config, optimizer, initial state, null caption and a random batch."""
  config = TrainConfig.from_mapping(tiny_train_config("", ema_decay=0.9, **overrides))
  model_config = config.model
  optimizer = make_optimizer(config)
  graphdef, state = create_train_state(model_config, optimizer, seed=0)
  null = np.zeros(model_config.text_max_len, np.int32)
  null[0] = 1
  rng = np.random.default_rng(seed)
  batch = {"image": rng.uniform(-1, 1, (batch_size, 32, 32, 3)).astype(np.float32),
           "tokens": rng.integers(3, 40, (batch_size, model_config.text_max_len)).astype(
               np.int32)}
  return config, model_config, optimizer, graphdef, state, null, batch


@pytest.mark.slow
def test_accumulated_step_equals_mean_of_microbatch_gradients():
  config, model_config, optimizer, graphdef, state, null, batch = _setup(8, 0, grad_accum_steps=2)
  new_state, metrics = jax.jit(make_train_step(graphdef, config, optimizer, null,
                                               masked=False))(state, batch)

  # The same step by hand: two strided halves (rows i, i + 2, ...), each with its own key.
  loss_fn = make_loss_fn(graphdef, config, null, masked=False)
  _, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
  grad_fn = jax.jit(jax.grad(loss_fn, has_aux=True))
  grads, losses = [], []
  for i in range(2):
    half = {k: v[i::2] for k, v in batch.items()}
    g, (loss, _) = grad_fn(state.params, half, jax.random.fold_in(step_rng, i))
    grads.append(g)
    losses.append(loss)
  mean_grads = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  updates, _ = optimizer.update(mean_grads, state.opt_state, state.params)
  expected = jax.tree.map(jnp.add, state.params, updates)
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-6)
  decay = float(ema_decay_at(jnp.array(0), 0.9))
  for ema, old, new in zip(jax.tree.leaves(new_state.ema_params), jax.tree.leaves(state.params),
                           jax.tree.leaves(new_state.params)):
    np.testing.assert_allclose(ema, decay * old + (1 - decay) * new, rtol=1e-5, atol=1e-7)
  assert int(new_state.step) == 1


@pytest.mark.slow
def test_nonfinite_step_leaves_the_state_bit_for_bit_and_a_finite_one_moves_it():
  config, model_config, optimizer, graphdef, state, null, batch = _setup(4, 1)
  step = jax.jit(make_train_step(graphdef, config, optimizer, null, masked=False))
  # Move off the initial state first, so the EMA and optimizer moments differ from the params.
  state, _ = step(state, batch)
  poisoned = dict(batch, image=batch["image"].copy())
  poisoned["image"][0, 0, 0, 0] = np.nan
  skipped, metrics = step(state, poisoned)
  assert bool(metrics["nonfinite"])
  assert int(skipped.step) == int(state.step) + 1
  for part in ("params", "ema_params", "opt_state"):
    for got, want in zip(jax.tree.leaves(getattr(skipped, part)),
                         jax.tree.leaves(getattr(state, part))):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=part)
  moved, metrics = step(state, batch)
  assert not bool(metrics["nonfinite"])
  for part in ("params", "ema_params"):
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(getattr(moved, part)),
                                                         jax.tree.leaves(getattr(state, part)))]
    assert any(changed), part  # adaLN-zero: early on only some leaves get gradients

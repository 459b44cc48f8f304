"""Tests for the rectified-flow training utilities against closed-form answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ecdit_jax.diffusion import rectified_flow as rf


def test_logit_normal_timesteps_have_requested_logit_moments():
  num_samples = 200_000
  for loc, scale in [(0.0, 1.0), (-0.5, 0.7)]:
    t = rf.sample_timesteps(jax.random.key(0), num_samples, loc=loc, scale=scale)
    assert t.shape == (num_samples,) and t.dtype == jnp.float32
    assert bool(jnp.all((t > 0) & (t < 1)))
    logits = np.log(np.asarray(t, np.float64)) - np.log1p(-np.asarray(t, np.float64))
    # Standard errors: scale / sqrt(n) ~ 0.002 for the mean, smaller for the std.
    assert abs(logits.mean() - loc) < 0.01
    assert abs(logits.std() - scale) < 0.01


def test_sample_timesteps_dtype_and_determinism():
  a = rf.sample_timesteps(jax.random.key(3), 16, dtype=jnp.bfloat16)
  b = rf.sample_timesteps(jax.random.key(3), 16, dtype=jnp.bfloat16)
  assert a.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_add_noise_endpoints_and_broadcast():
  key_data, key_noise = jax.random.split(jax.random.key(1))
  x0 = jax.random.normal(key_data, (3, 5, 2))
  noise = jax.random.normal(key_noise, (3, 5, 2))
  np.testing.assert_allclose(rf.add_noise(x0, noise, jnp.zeros(3)), x0)
  np.testing.assert_allclose(rf.add_noise(x0, noise, jnp.ones(3)), noise)
  t = jnp.array([0.0, 0.25, 1.0])
  expected = np.stack(
    [
      np.asarray(x0[0]),
      0.75 * np.asarray(x0[1]) + 0.25 * np.asarray(noise[1]),
      np.asarray(noise[2]),
    ]
  )
  np.testing.assert_allclose(rf.add_noise(x0, noise, t), expected, rtol=1e-6, atol=1e-6)


def test_velocity_target_is_time_derivative_of_interpolation():
  key_data, key_noise = jax.random.split(jax.random.key(2))
  x0 = jax.random.normal(key_data, (4, 6))
  noise = jax.random.normal(key_noise, (4, 6))
  derivative = jax.jacfwd(lambda s: rf.add_noise(x0, noise, jnp.full((4,), s)))(0.3)
  np.testing.assert_allclose(derivative, rf.velocity_target(x0, noise), rtol=1e-5, atol=1e-5)


def test_loss_of_exact_field_equals_irreducible_loss(gaussian_flow):
  batch, dim = 100_000, gaussian_flow.mu.shape[0]
  key_data, key_noise, key_time = jax.random.split(jax.random.key(4), 3)
  x0 = gaussian_flow.mu + gaussian_flow.sigma * jax.random.normal(key_data, (batch, dim))
  noise = jax.random.normal(key_noise, (batch, dim))
  t = rf.sample_timesteps(key_time, batch)
  x_t = rf.add_noise(x0, noise, t)
  target = rf.velocity_target(x0, noise)

  exact_loss = float(rf.flow_matching_loss(gaussian_flow.velocity(x_t, t), target))
  analytic = float(jnp.mean(gaussian_flow.irreducible_loss(t)))
  assert abs(exact_loss - analytic) < 0.02 * analytic

  # Any perturbation of the optimal field must do worse.
  for perturbation in [lambda v: 1.1 * v, lambda v: v + 0.1, lambda v: 0.9 * v]:
    perturbed = float(rf.flow_matching_loss(perturbation(gaussian_flow.velocity(x_t, t)), target))
    assert perturbed > exact_loss


def test_loss_unweighted_is_plain_mse():
  pred = jnp.arange(12.0).reshape(2, 3, 2)
  target = jnp.zeros_like(pred)
  np.testing.assert_allclose(rf.flow_matching_loss(pred, target), np.mean(np.arange(12.0) ** 2))


def test_drop_captions_fraction_and_rows():
  batch, length = 20_000, 5
  tokens = jnp.broadcast_to(jnp.arange(1, length + 1, dtype=jnp.int32), (batch, length))
  tokens = tokens + 10 * jnp.arange(batch, dtype=jnp.int32)[:, None]
  null_tokens = jnp.zeros((length,), jnp.int32)
  dropped = jax.jit(rf.drop_captions, static_argnums=3)(jax.random.key(6), tokens, null_tokens, 0.1)

  is_null = np.all(np.asarray(dropped) == 0, axis=1)
  is_unchanged = np.all(np.asarray(dropped) == np.asarray(tokens), axis=1)
  assert np.all(is_null | is_unchanged)
  # Binomial std of the fraction is sqrt(0.09 / 20000) ~ 0.002.
  assert abs(is_null.mean() - 0.1) < 0.01

  mask = rf.caption_drop_mask(jax.random.key(6), batch, 0.1)
  np.testing.assert_array_equal(np.asarray(mask), is_null)


def test_drop_context_replaces_the_rows_drop_captions_drops():
  batch, length, width = 512, 6, 3
  key = jax.random.key(11)
  context = jax.random.normal(jax.random.key(12), (batch, length, width))
  lengths = jnp.arange(batch, dtype=jnp.int32) % length + 1
  null_context = jnp.full((length, width), -5.0)
  dropped, dropped_lengths = jax.jit(rf.drop_context, static_argnums=5)(
    key, context, lengths, null_context, 1, 0.3
  )
  row_ids = jnp.broadcast_to(jnp.arange(1, batch + 1)[:, None], (batch, length))
  tokens_dropped = np.asarray(rf.drop_captions(key, row_ids, jnp.zeros((length,)), 0.3))
  drop = np.all(tokens_dropped == 0, axis=1)
  assert 0.2 < drop.mean() < 0.4
  np.testing.assert_array_equal(np.asarray(dropped)[drop], -5.0 * np.ones((drop.sum(), length, width)))
  np.testing.assert_array_equal(np.asarray(dropped)[~drop], np.asarray(context)[~drop])
  np.testing.assert_array_equal(np.asarray(dropped_lengths)[drop], 1)
  np.testing.assert_array_equal(np.asarray(dropped_lengths)[~drop], np.asarray(lengths)[~drop])
  assert dropped_lengths.dtype == jnp.int32
  with pytest.raises(ValueError, match="null_context"):
    rf.drop_context(key, context, lengths, jnp.zeros((length,)), 1, 0.1)


def test_drop_captions_extremes_and_embeddings():
  tokens = jax.random.normal(jax.random.key(7), (64, 3, 4))
  null_embedding = jnp.full((3, 4), -7.0)
  np.testing.assert_array_equal(
    rf.drop_captions(jax.random.key(8), tokens, null_embedding, 0.0), tokens
  )
  all_dropped = rf.drop_captions(jax.random.key(8), tokens, null_embedding, 1.0)
  np.testing.assert_array_equal(all_dropped, jnp.broadcast_to(null_embedding, tokens.shape))
  with pytest.raises(ValueError, match="null_tokens"):
    rf.drop_captions(jax.random.key(8), tokens, jnp.zeros((3,)), 0.1)

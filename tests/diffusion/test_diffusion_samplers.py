"""Tests for the ODE samplers and classifier-free guidance using the exact Gaussian field."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ecdit_jax.diffusion import samplers


def _noise(batch=4096, dim=4, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, dim))


def _max_error(method, gaussian_flow, noise, num_steps):
  run = jax.jit(
    functools.partial(
      samplers.sample, gaussian_flow.velocity, num_steps=num_steps, method=method
    )
  )
  generated = run(noise)
  return float(jnp.max(jnp.abs(generated - gaussian_flow.transport(noise)))), generated


def test_timestep_grid():
  np.testing.assert_allclose(samplers.sampling_timesteps(4), [1.0, 0.75, 0.5, 0.25, 0.0])
  with pytest.raises(ValueError, match="num_steps"):
    samplers.sampling_timesteps(0)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_step_outputs_are_stacked_per_step_without_changing_the_samples(method, gaussian_flow):
  noise = _noise(batch=8)

  def velocity_and_time(x, t):
    return gaussian_flow.velocity(x, t), t[0]  # what a step saw: its (first) evaluation's time

  plain = samplers.sample(gaussian_flow.velocity, noise, 4, method)
  samples, times = samplers.sample(velocity_and_time, noise, 4, method, with_outputs=True)
  np.testing.assert_array_equal(samples, plain)
  np.testing.assert_allclose(times, [1.0, 0.75, 0.5, 0.25])


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_generated_samples_match_gaussian_data(method, gaussian_flow):
  noise = _noise()
  errors = []
  for num_steps in (4, 8, 16, 32):
    error, generated = _max_error(method, gaussian_flow, noise, num_steps)
    errors.append(error)
  # Error shrinks with the step count, at roughly the method's order.
  assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
  order = np.log2(errors[-2] / errors[-1])
  assert order > (0.8 if method == "euler" else 1.6), errors
  # Sample moments of the finest run match the data distribution.
  reference = gaussian_flow.transport(noise)
  np.testing.assert_allclose(generated.mean(0), gaussian_flow.mu, atol=0.03)
  np.testing.assert_allclose(generated.std(0), gaussian_flow.sigma, atol=0.03)
  np.testing.assert_allclose(generated.mean(0), reference.mean(0), atol=2 * errors[-1])
  np.testing.assert_allclose(generated.std(0), reference.std(0), atol=2 * errors[-1])


def test_heun_much_more_accurate_than_euler(gaussian_flow):
  noise = _noise()
  for num_steps in (8, 16):
    euler_error, _ = _max_error("euler", gaussian_flow, noise, num_steps)
    heun_error, _ = _max_error("heun", gaussian_flow, noise, num_steps)
    assert heun_error < euler_error / 5, (num_steps, euler_error, heun_error)


def test_sampler_is_deterministic_and_per_sample(gaussian_flow):
  noise = _noise(batch=16)
  run = jax.jit(lambda z: samplers.sample(gaussian_flow.velocity, z, 6, method="heun"))
  first, second = run(noise), run(noise)
  np.testing.assert_array_equal(first, second)
  # Each sample depends only on its own noise: a sub-batch gives the same outputs.
  np.testing.assert_allclose(run(noise[:5]), first[:5], rtol=1e-6, atol=1e-6)


def test_velocity_fn_receives_batched_float32_time():
  seen = []

  def velocity_fn(x, t):
    seen.append((t.shape, t.dtype))
    return jnp.zeros_like(x)

  noise = jnp.ones((3, 2, 2), jnp.bfloat16)
  out = jax.jit(lambda z: samplers.sample(velocity_fn, z, 5))(noise)
  assert out.dtype == jnp.bfloat16
  assert seen and all(shape == (3,) and dtype == jnp.float32 for shape, dtype in seen)


def test_sample_rejects_unknown_method():
  with pytest.raises(ValueError, match="method"):
    samplers.sample(lambda x, t: x, jnp.zeros((1, 1)), 2, method="rk4")


def _linear_toy_model(x, t, conditioning):
  """v = 2 x + t * (embedding @ W): linear in the conditioning embedding."""
  weight = jnp.arange(6.0).reshape(3, 2) / 10
  return 2 * x + t[:, None] * (conditioning["embedding"] @ weight) + conditioning["bias"]


def _toy_conditions():
  cond = {
    "embedding": jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]),
    "bias": jnp.array([[0.1, 0.2], [0.3, 0.4]]),
  }
  uncond = {"embedding": jnp.zeros((2, 3)), "bias": jnp.zeros((2, 2))}
  return cond, uncond


def test_cfg_endpoints_and_linear_combination():
  cond, uncond = _toy_conditions()
  x = jnp.array([[1.0, -1.0], [0.0, 2.0]])
  t = jnp.array([0.3, 0.8])
  v_cond = _linear_toy_model(x, t, cond)
  v_uncond = _linear_toy_model(x, t, uncond)

  guided_one = samplers.cfg_velocity_fn(_linear_toy_model, cond, uncond, 1.0)(x, t)
  guided_zero = samplers.cfg_velocity_fn(_linear_toy_model, cond, uncond, 0.0)(x, t)
  np.testing.assert_array_equal(guided_one, v_cond)
  np.testing.assert_array_equal(guided_zero, v_uncond)

  scale = 4.5
  guided = jax.jit(
    lambda s, x, t: samplers.cfg_velocity_fn(_linear_toy_model, cond, uncond, s)(x, t)
  )(scale, x, t)
  # Linear model: guidance is the model evaluated at the extrapolated conditioning.
  extrapolated = jax.tree_util.tree_map(lambda c, u: u + scale * (c - u), cond, uncond)
  np.testing.assert_allclose(guided, _linear_toy_model(x, t, extrapolated), rtol=1e-5, atol=1e-5)


def test_cfg_uses_one_model_call_on_doubled_batch():
  cond, uncond = _toy_conditions()
  batch_sizes = []

  def model_fn(x, t, conditioning):
    batch_sizes.append((x.shape[0], t.shape[0], conditioning["embedding"].shape[0]))
    return _linear_toy_model(x, t, conditioning)

  velocity_fn = samplers.cfg_velocity_fn(model_fn, cond, uncond, 3.0)
  noise = jax.random.normal(jax.random.key(0), (2, 2))
  out = jax.jit(lambda z: samplers.sample(velocity_fn, z, 10))(noise)
  assert out.shape == noise.shape and bool(jnp.all(jnp.isfinite(out)))
  # Traced once inside the loop body: one call on the concatenated [cond; uncond] batch.
  assert batch_sizes == [(4, 4, 4)]


def test_cfg_rejects_mismatched_structures():
  cond, _ = _toy_conditions()
  with pytest.raises(ValueError, match="structure"):
    samplers.cfg_velocity_fn(_linear_toy_model, cond, {"embedding": jnp.zeros((2, 3))}, 2.0)

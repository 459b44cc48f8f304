"""Shared reference for the diffusion tests: the exact rectified-flow field of Gaussian data.

For data x0 ~ N(mu, sigma^2 I) and independent noise ~ N(0, I), x_t = (1 - t) x0 + t noise
and v = noise - x0 are jointly Gaussian per coordinate with

    E[x_t] = (1 - t) mu,          Var[x_t] = (1 - t)^2 sigma^2 + t^2,
    E[v] = -mu,                   Cov[v, x_t] = t - (1 - t) sigma^2,

so the optimal (conditional-mean) velocity is linear in x_t:

    v*(x, t) = -mu + (t - (1 - t) sigma^2) / ((1 - t)^2 sigma^2 + t^2) * (x - (1 - t) mu),

and the irreducible loss E[Var(v | x_t)] = Var[v] - Cov^2 / Var[x_t] simplifies to
sigma^2 / ((1 - t)^2 sigma^2 + t^2) per coordinate. The ODE of this field maps the noise z
at t = 1 to mu + sigma * z at t = 0 (x_t = (1 - t) mu + sqrt(Var[x_t]) z solves it).
"""

import jax.numpy as jnp
import pytest


class GaussianFlow:
  """Closed-form quantities for x0 ~ N(mu, sigma^2 I)."""

  def __init__(self, mu, sigma):
    self.mu = jnp.asarray(mu, dtype=jnp.float32)
    self.sigma = float(sigma)

  def _gain(self, t):
    variance = (1 - t) ** 2 * self.sigma**2 + t**2
    return (t - (1 - t) * self.sigma**2) / variance

  def velocity(self, x, t):
    t = t.reshape(t.shape + (1,) * (x.ndim - 1))
    return -self.mu + self._gain(t) * (x - (1 - t) * self.mu)

  def irreducible_loss(self, t):
    return self.sigma**2 / ((1 - t) ** 2 * self.sigma**2 + t**2)

  def transport(self, noise):
    """Where the exact ODE takes noise at t = 1 when integrated to t = 0."""
    return self.mu + self.sigma * noise


@pytest.fixture
def gaussian_flow():
  return GaussianFlow(mu=[1.5, -0.5, 0.0, 3.0], sigma=0.5)

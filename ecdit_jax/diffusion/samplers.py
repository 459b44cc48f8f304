"""Deterministic ODE samplers for rectified flow, plus classifier-free guidance.

Generation integrates ``dx/dt = v(x, t)`` from ``t = 1`` (the noise the caller supplies) down to
``t = 0`` (data) on ``num_steps`` uniform steps, following the convention of
:mod:`ecdit_jax.diffusion.rectified_flow`. ``velocity_fn(x, t)`` receives the current state ``x``
(leading batch axis B) and ``t`` as a float32 (B,) array, and returns a velocity with the shape
of ``x``: or, for ``sample(..., with_outputs=True)``, ``(velocity, outputs)``, a pytree of
anything the caller wants to see at every step (routing statistics, say), which the sampler
stacks along a leading steps axis.

Each sampler is one ``lax.scan`` over the (static) step count, so under ``jax.jit`` the whole
sampler compiles to one loop whose body contains the model once (Euler) or twice (Heun).
The state is carried in the dtype of ``noise``; each update is computed in at least float32.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp

METHODS = {"euler": 1, "heun": 2}  # model evaluations per step

VelocityFn = Callable[[jax.Array, jax.Array], Any]


def sampling_timesteps(num_steps: int) -> jax.Array:
  """The ``num_steps + 1`` float32 grid times, from exactly 1.0 down to exactly 0.0."""
  if (isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral)
      or num_steps < 1):
    raise ValueError(f"num_steps must be a positive Python integer, got {num_steps!r}")
  return 1.0 - jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps


def _wide(x: jax.Array):
  return jnp.promote_types(x.dtype, jnp.float32)


def _evaluate(velocity_fn, x, t, with_outputs: bool):
  """The velocity at per-example time ``t`` in compute precision, and the step's outputs."""
  result = velocity_fn(x, jnp.full((x.shape[0],), t, dtype=jnp.float32))
  velocity, outputs = result if with_outputs else (result, None)
  return velocity.astype(_wide(x)), outputs


def _euler_step(velocity_fn, x, t_cur, t_next, with_outputs):
  step = (t_next - t_cur).astype(_wide(x))
  velocity, outputs = _evaluate(velocity_fn, x, t_cur, with_outputs)
  return (x.astype(step.dtype) + step * velocity).astype(x.dtype), outputs


def _heun_step(velocity_fn, x, t_cur, t_next, with_outputs):
  # Trapezoidal rule with an Euler predictor: average the slopes at both ends. The step's
  # outputs are those of its first evaluation (at t_cur, like Euler's).
  step = (t_next - t_cur).astype(_wide(x))
  x_wide = x.astype(step.dtype)
  velocity_cur, outputs = _evaluate(velocity_fn, x, t_cur, with_outputs)
  predicted = (x_wide + step * velocity_cur).astype(x.dtype)
  velocity_next, _ = _evaluate(velocity_fn, predicted, t_next, with_outputs)
  return (x_wide + 0.5 * step * (velocity_cur + velocity_next)).astype(x.dtype), outputs


def sample(velocity_fn: VelocityFn, noise: jax.Array, num_steps: int, method: str = "euler", *,
           with_outputs: bool = False):
  """Integrates from ``t = 1`` to ``t = 0`` with Euler (``num_steps`` model calls) or Heun
  (``2 num_steps``; every step a full Heun step, as the rectified-flow velocity at ``t = 0``
  is well defined). Deterministic: the output is a fixed function of ``noise``.

  Returns the samples, or with ``with_outputs`` (samples, the steps' outputs stacked).
  """
  steppers = {"euler": _euler_step, "heun": _heun_step}
  if method not in steppers:
    raise ValueError(f"method must be one of {sorted(steppers)}, got {method!r}")
  times = sampling_timesteps(num_steps)

  def body(x, index):
    return steppers[method](velocity_fn, x, times[index], times[index + 1], with_outputs)

  x, outputs = jax.lax.scan(body, noise, jnp.arange(num_steps))
  return (x, outputs) if with_outputs else x


def cfg_velocity_fn(model_fn: Callable, cond: Any, uncond: Any, guidance_scale, *,
                    with_outputs: bool = False) -> VelocityFn:
  """Wraps a conditional model into a classifier-free-guided ``velocity_fn(x, t)``.

  ``model_fn(x, t, conditioning)`` is called ONCE per evaluation on the doubled batch
  ``[x; x]`` with times ``[t; t]`` and conditioning ``[cond; uncond]`` (every leaf of the two
  pytrees concatenated along axis 0), and the halves are combined as

      v = v_uncond + s * (v_cond - v_uncond),

  evaluated as ``(1 - s) * v_uncond + s * v_cond`` so that ``s = 1`` returns the conditional
  prediction and ``s = 0`` the unconditional one exactly. One joint call also keeps both
  halves in the same batch. With ``with_outputs``, ``model_fn`` returns (velocity, outputs of
  the doubled batch) and so does the guided function.
  """
  tree_structure = jax.tree_util.tree_structure(cond)
  if jax.tree_util.tree_structure(uncond) != tree_structure:
    raise ValueError("cond and uncond must have the same pytree structure")
  joint_conditioning = jax.tree_util.tree_map(
      lambda c, u: jnp.concatenate([jnp.asarray(c), jnp.asarray(u)], axis=0), cond, uncond)

  def velocity_fn(x: jax.Array, t: jax.Array):
    batch_size = x.shape[0]
    result = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0),
                      joint_conditioning)
    joint_velocity, outputs = result if with_outputs else (result, None)
    v_cond, v_uncond = joint_velocity[:batch_size], joint_velocity[batch_size:]
    # Combine in at least float32 so fractional scales are not rounded to bf16.
    compute_dtype = jnp.promote_types(joint_velocity.dtype, jnp.float32)
    scale = jnp.asarray(guidance_scale, dtype=compute_dtype)
    guided = (1 - scale) * v_uncond.astype(compute_dtype) + scale * v_cond.astype(compute_dtype)
    guided = guided.astype(joint_velocity.dtype)
    return (guided, outputs) if with_outputs else guided

  return velocity_fn

"""Deterministic ODE samplers for rectified flow, plus classifier-free guidance.

Generation integrates ``dx/dt = v(x, t)`` from ``t = 1`` (the noise the
caller supplies) down to ``t = 0`` (data), following the convention of
:mod:`ecdit_jax.diffusion.rectified_flow`.

Time grid: ``num_steps`` uniform steps ``u_i = 1 - i / num_steps`` warped by
the time shift ``t = shift * u / (1 + (shift - 1) * u)``. ``shift = 1`` is the
uniform grid; ``shift > 1`` spends more steps at high noise, which helps at
high resolution where the coarse image structure is decided early.

Each sampler is a single ``lax.fori_loop`` over the (static) step count, so
under ``jax.jit`` the whole sampler compiles to one loop whose body contains
the model once (Euler) or twice (Heun). ``velocity_fn(x, t)`` receives the
current state ``x`` (leading batch axis ``B``) and ``t`` as a float32 ``(B,)``
array, and must return a velocity with the shape of ``x``.

Precision: the state is carried in the dtype of ``noise``; each update is
computed in at least float32 and cast back.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = [
  "shift_timesteps",
  "sampling_timesteps",
  "euler_sample",
  "heun_sample",
  "sample",
  "cfg_velocity_fn",
]

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_num_steps(num_steps) -> None:
  if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive Python integer, got {num_steps!r}")


def _check_shift(shift) -> None:
  # A traced shift cannot be validated here; only concrete numbers are checked.
  if isinstance(shift, numbers.Real) and not shift >= 1.0:
    raise ValueError(f"shift must be >= 1, got {shift!r}")


def shift_timesteps(t, shift=1.0) -> jax.Array:
  """Warps times toward high noise: ``shift * t / (1 + (shift - 1) * t)``.

  Fixes the endpoints 0 and 1, is monotone, and is the identity at ``shift = 1``.
  """
  _check_shift(shift)
  t = jnp.asarray(t, dtype=jnp.float32)
  return shift * t / (1.0 + (shift - 1.0) * t)


def sampling_timesteps(num_steps: int, shift=1.0) -> jax.Array:
  """The ``num_steps + 1`` float32 grid times, from exactly 1.0 down to exactly 0.0."""
  _check_num_steps(num_steps)
  uniform = 1.0 - jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps
  return shift_timesteps(uniform, shift)


def _compute_dtype(x: jax.Array):
  return jnp.promote_types(x.dtype, jnp.float32)


def _evaluate(velocity_fn: VelocityFn, x: jax.Array, t: jax.Array) -> jax.Array:
  """Calls the model with per-example times and returns the velocity in compute precision."""
  t_batch = jnp.full((x.shape[0],), t, dtype=jnp.float32)
  return velocity_fn(x, t_batch).astype(_compute_dtype(x))


def _euler_step(velocity_fn: VelocityFn, x, t_cur, t_next):
  step = (t_next - t_cur).astype(_compute_dtype(x))
  velocity = _evaluate(velocity_fn, x, t_cur)
  return (x.astype(step.dtype) + step * velocity).astype(x.dtype)


def _heun_step(velocity_fn: VelocityFn, x, t_cur, t_next):
  # Trapezoidal rule with an Euler predictor: average the slopes at both ends.
  step = (t_next - t_cur).astype(_compute_dtype(x))
  x_wide = x.astype(step.dtype)
  velocity_cur = _evaluate(velocity_fn, x, t_cur)
  predicted = (x_wide + step * velocity_cur).astype(x.dtype)
  velocity_next = _evaluate(velocity_fn, predicted, t_next)
  return (x_wide + 0.5 * step * (velocity_cur + velocity_next)).astype(x.dtype)


def euler_sample(
  velocity_fn: VelocityFn, noise: jax.Array, num_steps: int, *, shift=1.0
) -> jax.Array:
  """First-order Euler integration from ``t = 1`` to ``t = 0``; ``num_steps`` model calls.

  Deterministic: the output is a fixed function of ``noise``.
  """
  times = sampling_timesteps(num_steps, shift)

  def body(step_index, x):
    return _euler_step(velocity_fn, x, times[step_index], times[step_index + 1])

  return jax.lax.fori_loop(0, num_steps, body, noise)


def heun_sample(
  velocity_fn: VelocityFn,
  noise: jax.Array,
  num_steps: int,
  *,
  shift=1.0,
  final_step_euler: bool = False,
) -> jax.Array:
  """Second-order Heun integration from ``t = 1`` to ``t = 0``.

  By default every step, including the last one that lands on ``t = 0``, is
  a full Heun step (``2 * num_steps`` model calls): for rectified flow the
  velocity at ``t = 0`` is well defined, unlike the EDM ``sigma = 0`` case.
  With ``final_step_euler=True`` the last step is a plain Euler step
  (``2 * num_steps - 1`` calls), for models that were never trained near
  ``t = 0`` (logit-normal training rarely samples there).
  """
  times = sampling_timesteps(num_steps, shift)
  num_heun_steps = num_steps - 1 if final_step_euler else num_steps

  def body(step_index, x):
    return _heun_step(velocity_fn, x, times[step_index], times[step_index + 1])

  x = jax.lax.fori_loop(0, num_heun_steps, body, noise)
  if final_step_euler:
    x = _euler_step(velocity_fn, x, times[num_steps - 1], times[num_steps])
  return x


def sample(
  velocity_fn: VelocityFn, noise: jax.Array, num_steps: int, method: str = "euler", shift=1.0
) -> jax.Array:
  """Dispatches to :func:`euler_sample` or :func:`heun_sample` by ``method`` name."""
  if method == "euler":
    return euler_sample(velocity_fn, noise, num_steps, shift=shift)
  if method == "heun":
    return heun_sample(velocity_fn, noise, num_steps, shift=shift)
  raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")


def cfg_velocity_fn(
  model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], cond: Any, uncond: Any, guidance_scale
) -> VelocityFn:
  """Wraps a conditional model into a classifier-free-guided ``velocity_fn(x, t)``.

  ``model_fn(x, t, conditioning)`` is called ONCE per evaluation on the
  doubled batch ``[x; x]`` with times ``[t; t]`` and conditioning
  ``[cond; uncond]`` (every leaf of the two pytrees concatenated along axis
  0), and the halves are combined as

      v = v_uncond + s * (v_cond - v_uncond),

  evaluated as ``(1 - s) * v_uncond + s * v_cond`` so that ``s = 1`` returns
  the conditional prediction and ``s = 0`` the unconditional one exactly.
  One joint call also keeps both halves in the same batch, which matters for
  expert-choice routing where experts pick tokens across the whole batch.
  """
  tree_structure = jax.tree_util.tree_structure(cond)
  if jax.tree_util.tree_structure(uncond) != tree_structure:
    raise ValueError("cond and uncond must have the same pytree structure")
  joint_conditioning = jax.tree_util.tree_map(
    lambda c, u: jnp.concatenate([jnp.asarray(c), jnp.asarray(u)], axis=0), cond, uncond
  )

  def velocity_fn(x: jax.Array, t: jax.Array) -> jax.Array:
    batch_size = x.shape[0]
    joint_velocity = model_fn(
      jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), joint_conditioning
    )
    v_cond, v_uncond = joint_velocity[:batch_size], joint_velocity[batch_size:]
    # Combine in at least float32 so fractional scales are not rounded to bf16.
    compute_dtype = jnp.promote_types(joint_velocity.dtype, jnp.float32)
    scale = jnp.asarray(guidance_scale, dtype=compute_dtype)
    guided = (1 - scale) * v_uncond.astype(compute_dtype) + scale * v_cond.astype(compute_dtype)
    return guided.astype(joint_velocity.dtype)

  return velocity_fn

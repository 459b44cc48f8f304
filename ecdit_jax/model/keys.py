"""A light stand-in for ``nnx.Rngs`` when building the model inside a trace.

``nnx.Rngs`` keeps its counter in a Variable; under ``jax.eval_shape`` or ``jax.jit`` every
update of that counter costs a walk over the whole trace, which makes building a large model
quadratic in its parameter count (seconds for XL, longer for M). ``ParamKeys`` counts in Python,
so a traced build is linear. The model's modules only ever call ``rngs.params()``.
"""

from __future__ import annotations

import jax


class ParamKeys:
  """Deterministic parameter keys: the i-th call returns fold_in(key, i)."""

  def __init__(self, seed_or_key: int | jax.Array = 0):
    if isinstance(seed_or_key, int):
      seed_or_key = jax.random.key(seed_or_key)
    self._key = seed_or_key
    self._count = 0

  def params(self) -> jax.Array:
    key = jax.random.fold_in(self._key, self._count)
    self._count += 1
    return key

  __call__ = params

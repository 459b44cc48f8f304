"""Blocks stacked along a leading "layers" axis, for a scan over layers.

With ``config.model.scan_layers`` the DiT keeps, for each position j of the repeating dense/MoE
pattern of ``config.layer_period`` blocks, one block module whose parameters hold blocks
j, j + period, j + 2 period, ... stacked along a new leading axis (logical name ``layers``).
The forward pass is then one ``lax.scan`` over repeats of the pattern.

The stacked model is built by building the blocks one by one, in the unrolled model's order,
and stacking them: the same seed gives the same weights in either layout, and
``stack_block_params`` / ``unstack_block_params`` convert a parameter dict (a checkpoint's,
say) from one layout to the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import spmd

from ecdit_jax.parallel import axes

UNROLLED_KEY = "blocks"  # params["dit"]["blocks"][i]: block i
STACKED_KEY = "stacked_blocks"  # params["dit"]["stacked_blocks"][j]: blocks j, j + period, ...


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
  """One module of the same structure whose variables stack those of ``modules`` (axis 0).

  The stacked parameters' logical names gain a leading ``layers`` entry, so the sharding rules
  see the new axis (and keep it whole).
  """
  graphdef = nnx.graphdef(modules[0])
  states = [nnx.state(m) for m in modules]
  for i, m in enumerate(modules[1:], 1):
    if nnx.graphdef(m) != graphdef:
      raise ValueError(f"module {i} differs in structure from module 0 and cannot be stacked")
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  stacked = spmd.add_axis(stacked, 0, {nnx.PARTITION_NAME: axes.LAYERS})
  return nnx.merge(graphdef, stacked)


# Modules whose weights are used in float32 whatever the compute dtype (router logits).
FLOAT32_MODULES = ("router",)


def _names(path) -> set[str]:
  return {str(getattr(k, "key", k)) for k in path}


def _cast_at_use(names: set[str], layer_rank: int, x, dtype) -> bool:
  """Whether the model casts this weight to the compute dtype wherever it uses it: floating
  weights of rank >= 2 within a layer (the matrices, the per-head and per-expert biases),
  outside ``FLOAT32_MODULES``. The others (norm scales, plain biases) enter float32 math."""
  return (layer_rank >= 2 and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype
          and not names & set(FLOAT32_MODULES))


def cast_for_compute(state: Any, dtype) -> Any:
  """A stacked block's weights that the blocks use in ``dtype`` (``_cast_at_use``, one rank
  down for the stacking axis) in ``dtype``; the rest as they are.

  Inside a scan, every use of a layer's weight slices it from the stack; XLA GPU copies each
  slice out before the matmul reads it. Casting the stacks once, before the scan, makes those
  copies half the bytes and takes the casts out of the loop. The blocks cast these weights to
  the compute dtype at use anyway, so the values (and the gradients, cast back) are unchanged.
  """
  dtype = jnp.dtype(dtype)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.astype(dtype) if _cast_at_use(_names(path), x.ndim - 1, x, dtype) else x,
      state)


def params_for_compute(params: Any, dtype) -> Any:
  """The model's parameter dict, in either layout, with every weight that the forward pass casts
  to ``dtype`` at use already in ``dtype``: the values the model computes with, cast once.

  A loop that runs the model many times over the same parameters (the micro-batches of a step,
  the steps of an ODE sampler) can cast them once before it rather than in every iteration (a
  sampling profile on an H100 showed XLA casting the weights again in every ODE step, a pass
  over all of them each time). The model's results, and gradients taken with respect to these
  copies and cast back, are those of the original parameters.
  """
  dtype = jnp.dtype(dtype)

  def cast(path, x):
    names = _names(path)
    rank = x.ndim - (STACKED_KEY in names)
    return x.astype(dtype) if _cast_at_use(names, rank, x, dtype) else x

  return jax.tree_util.tree_map_with_path(cast, params)


def scan_blocks(stacked: Sequence[nnx.Module], x: jax.Array, apply_block, compute_dtype=None):
  """Runs the pattern ``stacked`` (one stacked module per position) over all its repeats.

  ``apply_block(block, x) -> (x, aux or None)`` runs one block. Returns the final ``x`` and
  the aux dicts of the blocks that return one, stacked along a leading axis in layer order
  (None when no block does). With ``compute_dtype``, weights are cast to it before the scan
  (``cast_for_compute``).
  """
  graphdefs, states = zip(*(nnx.split(m) for m in stacked))
  if compute_dtype is not None:
    states = tuple(cast_for_compute(state, compute_dtype) for state in states)

  def body(x, layer_states):
    aux = []
    for graphdef, state in zip(graphdefs, layer_states):
      x, block_aux = apply_block(nnx.merge(graphdef, state), x)
      aux.append(block_aux)
    return x, aux

  x, aux = jax.lax.scan(body, x, list(states))
  present = [a for a in aux if a is not None]
  if not present:
    return x, None
  # Each holds one position's aux for every repeat (axis 0); interleaving the positions along
  # axis 1 and merging the two axes gives layer order: repeat-major, position within a repeat.
  return x, jax.tree.map(
      lambda *a: jnp.stack(a, axis=1).reshape((-1,) + a[0].shape[1:]), *present)


def _by_index(blocks: dict) -> list:
  """The values of a {i: tree} dict in order of i; keys may be ints or their strings (as a
  restored checkpoint may give them)."""
  keys = sorted(blocks, key=int)
  if [int(k) for k in keys] != list(range(len(keys))):
    raise ValueError(f"block keys {keys} are not 0..{len(keys) - 1}")
  return [blocks[k] for k in keys]


def stack_block_params(dit_params: dict, period: int) -> dict:
  """The DiT's parameter dict with ``blocks`` {i: tree} replaced by ``stacked_blocks``."""
  if UNROLLED_KEY not in dit_params:
    raise ValueError(f"no '{UNROLLED_KEY}' in the parameters: already stacked?")
  blocks = _by_index(dit_params[UNROLLED_KEY])
  if len(blocks) % period:
    raise ValueError(f"{len(blocks)} blocks do not split into repeats of {period}")
  stacked = {j: jax.tree.map(lambda *xs: jnp.stack(xs), *blocks[j::period])
             for j in range(period)}
  out = {k: v for k, v in dit_params.items() if k != UNROLLED_KEY}
  out[STACKED_KEY] = stacked
  return out


def unstack_block_params(dit_params: dict) -> dict:
  """The inverse of ``stack_block_params``: ``stacked_blocks`` -> ``blocks`` {i: tree}."""
  if STACKED_KEY not in dit_params:
    raise ValueError(f"no '{STACKED_KEY}' in the parameters: not stacked?")
  stacked = _by_index(dit_params[STACKED_KEY])
  period = len(stacked)
  repeats = jax.tree.leaves(stacked[0])[0].shape[0]
  blocks = {r * period + j: jax.tree.map(lambda a, r=r: a[r], stacked[j])
            for r in range(repeats) for j in range(period)}
  out = {k: v for k, v in dit_params.items() if k != STACKED_KEY}
  out[UNROLLED_KEY] = dict(sorted(blocks.items()))
  return out

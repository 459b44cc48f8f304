"""The expert-choice layer with experts sharded over the ``expert`` mesh axis (``shard_map``).

Per device, inside ``shard_map``:
  1. route the local images' tokens (expert choice is per routing group, so it is local by
     construction: no communication is needed to decide who goes where);
  2. pack each expert's C chosen tokens into a fixed (E, G, C, d) buffer;
  3. ``all_to_all`` over ``expert``: every device sends expert e's buffer to the device holding
     expert e, and receives its local experts' tokens from all devices of the axis;
  4. run the local experts as one batched einsum (hidden width split over ``tensor``, the
     partial outputs summed with ``psum``);
  5. ``all_to_all`` back and combine.
Buffers have a static size (E x C per group), so the exchange is a plain dense ``all_to_all``.

The batch enters split over the data-like axes (data, fsdp, expert); weights enter split by
expert (and by hidden width over ``tensor``), so FSDP-sharded weights are gathered at the
boundary and their gradients reduced back by the transpose of ``shard_map``. When the number of
routing groups does not divide evenly over the batch axes, whole dummy groups are appended and
dropped after the layer (they route among themselves only).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ecdit_jax.model import routing
from ecdit_jax.parallel.mesh import batch_axes

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


def _to_experts(buffers):
  # Expert e's buffers (E, G_local, C, d) go to the device that holds e; we receive (E_local,
  # n_expert * G_local, C, d): our experts' tokens from every device of the axis, in axis order.
  return jax.lax.all_to_all(buffers, EXPERT_AXIS, 0, 1, tiled=True)


def _from_experts(outputs):
  return jax.lax.all_to_all(outputs, EXPERT_AXIS, 1, 0, tiled=True)


def expert_choice_ffn(x: jax.Array, router_kernel: jax.Array, expert_weights, *, mesh,
                      capacity: int, group_size: int, dtype, method: str = "gather"):
  """x (B, S, d) -> (y (B, S, d), logits (G, N, E) f32, experts-per-token counts (G, N)).

  ``expert_weights`` = (w_in (E, d, h), b_in (E, h), w_out (E, h, d), b_out (E, d));
  ``method``: how tokens are dispatched and combined (``routing.dispatch``).
  """
  b, s, d = x.shape
  num_experts = router_kernel.shape[-1]
  hidden = expert_weights[0].shape[-1]
  n_expert = mesh.shape[EXPERT_AXIS]
  if num_experts % n_expert:
    raise ValueError(f"config.model.num_experts={num_experts} is not divisible by the "
                     f"expert mesh axis of size {n_expert} (config.mesh.expert)")
  groups = routing.to_groups(x, group_size)
  num_groups = groups.shape[0]
  splits = batch_axes(mesh)
  num_shards = math.prod(mesh.shape[a] for a in splits)
  padded = -(-num_groups // num_shards) * num_shards
  if padded != num_groups:
    groups = jnp.pad(groups, ((0, padded - num_groups), (0, 0), (0, 0)))
  n_tensor = mesh.shape[TENSOR_AXIS]
  tensor = TENSOR_AXIS if n_tensor > 1 and hidden % n_tensor == 0 else None

  def local(groups, router_kernel, w_in, b_in, w_out, b_out):
    return routing.expert_choice_layer(
        groups, router_kernel, (w_in, b_in, w_out, b_out), capacity=capacity, method=method,
        dtype=dtype, exchange=(_to_experts, _from_experts), tensor_axis=tensor)

  rows = P(splits or None)
  in_specs = (rows, P(), P(EXPERT_AXIS, None, tensor), P(EXPERT_AXIS, tensor),
              P(EXPERT_AXIS, tensor, None), P(EXPERT_AXIS, None))
  y, logits, counts = jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                                    out_specs=(rows, rows, rows))(
                                        groups, router_kernel, *expert_weights)
  y, logits, counts = y[:num_groups], logits[:num_groups], counts[:num_groups]
  return y.reshape(b, s, d), logits, counts

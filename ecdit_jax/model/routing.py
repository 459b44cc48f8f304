"""Routing as pure functions on (G, N, ...) arrays of G routing groups of N tokens.

Expert choice (Algorithm 1 of the EC-DiT paper), per group:
  logits = x W_r (float32);  scores = softmax over the E experts;
  each expert takes the C = round(N f / E) tokens with the highest score for it;
  y = sum over the experts that took a token of score * expert(x).
Every expert processes exactly C tokens, so there is nothing to balance and no auxiliary loss;
a token may be taken by any number of experts (0 .. E), which is how compute adapts per token.

Tokens move to the experts and back in one of three ways (``config.model.moe_dispatch``):
  "gather"  index the tokens; combine by a float32 scatter-add (whose gradient is a gather,
            and the gather's gradient a scatter-add);
  "einsum"  multiply by the one-hot (G, E, C, N) mask both ways: no scatter-add, whose atomic
            additions on GPU round differently from run to run, for 2 E C N d more
            multiply-adds per group each way (N / 4d of the expert FFNs' work);
  "hybrid"  the cheap direction of each: dispatch gathers and its gradient is the one-hot
            matmul; combine is the one-hot matmul and its gradients are gathers. Two one-hot
            matmuls a layer in training instead of five, and no scatter-add.
Dispatched tokens are laid out expert-major, (E, G, C, d): the layout the batched expert
matmuls read and write, so the gathers fill it directly instead of XLA transposing a
(G, E, C, d) buffer on the way in (and, in training, on the way back out).

The token-choice baseline (top-k per token, buffers with dropping, the load-balancing loss)
lives here too. ``moe.py`` holds the layers' parameters; both it and ``expert_parallel.py``
(the same routing inside ``shard_map``) call these functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

DISPATCH_METHODS = ("gather", "einsum", "hybrid")


def to_groups(x: jax.Array, group_size: int) -> jax.Array:
  """(B, S, d) images -> (B / group_size, group_size * S, d) routing groups."""
  b, s, d = x.shape
  if b % group_size:
    raise ValueError(f"the batch of {b} images is not divisible by "
                     f"config.model.routing_group_size={group_size}")
  return x.reshape(b // group_size, group_size * s, d)


def router_logits(groups: jax.Array, router_kernel: jax.Array) -> jax.Array:
  """(G, N, d) tokens x (d, E) -> float32 (G, N, E), whatever the compute dtype."""
  return jnp.einsum("gnd,de->gne", groups.astype(jnp.float32), router_kernel.astype(jnp.float32))


def expert_choice_route(logits: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Each expert picks its top-``capacity`` tokens by softmax score.

  Args:
    logits: (G, N, E) float32 router logits.
    capacity: C, tokens per expert (1 <= C <= N).
  Returns:
    gates (G, E, C) float32: the chosen tokens' scores; token_index (G, E, C) int32.
  """
  scores = jax.nn.softmax(logits, axis=-1)
  gates, token_index = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)
  return gates, token_index.astype(jnp.int32)


def gather_tokens(x: jax.Array, token_index: jax.Array) -> jax.Array:
  """x (G, N, d), token_index (G, E, C) -> (G, E, C, d)."""
  return jax.vmap(lambda rows, index: rows[index])(x, token_index)


def gather_by_expert(x: jax.Array, token_index: jax.Array) -> jax.Array:
  """x (G, N, d), token_index (G, E, C) -> (E, G, C, d): each expert's tokens, expert-major.

  One gather whose batch dimension is the group (so a partitioner keeps it local to the
  group's shard) and whose output is already in the experts' layout.
  """
  numbers = jax.lax.GatherDimensionNumbers(
      offset_dims=(3,), collapsed_slice_dims=(1,), start_index_map=(1,),
      operand_batching_dims=(0,), start_indices_batching_dims=(1,))
  index = jnp.swapaxes(token_index, 0, 1)[..., None]  # (E, G, C, 1)
  return jax.lax.gather(x, index, numbers, slice_sizes=(1, 1, x.shape[-1]),
                        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def scatter_add_by_expert(values: jax.Array, token_index: jax.Array,
                          num_tokens: int) -> jax.Array:
  """values (E, G, C, d) added into (G, N, d) at token_index (G, E, C), float32: the transpose
  of ``gather_by_expert``, one scatter batched over the groups."""
  e, g, c, d = values.shape
  numbers = jax.lax.ScatterDimensionNumbers(
      update_window_dims=(3,), inserted_window_dims=(1,), scatter_dims_to_operand_dims=(1,),
      operand_batching_dims=(0,), scatter_indices_batching_dims=(1,))
  index = jnp.swapaxes(token_index, 0, 1)[..., None]  # (E, G, C, 1)
  zeros = jnp.zeros((g, num_tokens, d), jnp.float32)
  return jax.lax.scatter_add(zeros, index, values.astype(jnp.float32), numbers,
                             mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _one_hot_combine(expert_out, gates, token_index, num_tokens):
  """Gate-weighted one-hot matmul in the outputs' dtype, accumulated in float32.

  expert_out (E, G, C, d); gates and token_index (G, E, C) -> (G, N, d).
  """
  weights = jax.nn.one_hot(token_index, num_tokens, dtype=jnp.float32) * gates[..., None]
  return jnp.einsum("gecn,egcd->gnd", weights.astype(expert_out.dtype), expert_out,
                    preferred_element_type=jnp.float32)


# --- hybrid dispatch and combine: custom gradients -----------------------------------------------
# A zero-size array of the groups' shape carries N to the backward passes as a static shape.

@jax.custom_vjp
def _hybrid_dispatch(groups: jax.Array, token_index: jax.Array) -> jax.Array:
  return gather_by_expert(groups, token_index)


def _hybrid_dispatch_forward(groups, token_index):
  return gather_by_expert(groups, token_index), (token_index, groups[:, :, :0])


def _hybrid_dispatch_backward(residuals, cotangent):
  token_index, empty = residuals
  onehot = jax.nn.one_hot(token_index, empty.shape[1], dtype=cotangent.dtype)
  grad = jnp.einsum("gecn,egcd->gnd", onehot, cotangent, preferred_element_type=jnp.float32)
  return grad.astype(empty.dtype), None


_hybrid_dispatch.defvjp(_hybrid_dispatch_forward, _hybrid_dispatch_backward)


@jax.custom_vjp
def _hybrid_combine(expert_out, gates, token_index, empty):
  return _one_hot_combine(expert_out, gates, token_index, empty.shape[1])


def _hybrid_combine_forward(expert_out, gates, token_index, empty):
  return (_one_hot_combine(expert_out, gates, token_index, empty.shape[1]),
          (expert_out, gates, token_index, empty))


def _hybrid_combine_backward(residuals, cotangent):
  expert_out, gates, token_index, empty = residuals
  picked = gather_by_expert(cotangent, token_index)  # (E, G, C, d) f32: d loss / d each choice
  grad_out = (picked * jnp.swapaxes(gates, 0, 1)[..., None]).astype(expert_out.dtype)
  grad_gates = jnp.swapaxes(jnp.sum(picked * expert_out.astype(jnp.float32), axis=-1), 0, 1)
  # The gates came out of top_k, whose gradient scatters these (G, E, C) values into (G, E, N).
  # Left to itself XLA fuses this reduction over d into that scatter, a slow kernel on GPU
  # (bench/records/2026-11-26_h100_moe-dispatch-hybrid/); the barrier keeps them apart.
  grad_gates = jax.lax.optimization_barrier(grad_gates)
  return grad_out, grad_gates.astype(gates.dtype), None, None


_hybrid_combine.defvjp(_hybrid_combine_forward, _hybrid_combine_backward)


def dispatch(groups: jax.Array, token_index: jax.Array, method: str, dtype) -> jax.Array:
  """Each expert's chosen tokens: (G, N, d) -> (E, G, C, d) in ``dtype`` (see the module doc)."""
  if method == "einsum":
    onehot = jax.nn.one_hot(token_index, groups.shape[1], dtype=dtype)
    return jnp.einsum("gecn,gnd->egcd", onehot, groups.astype(dtype))
  if method == "hybrid":
    return _hybrid_dispatch(groups.astype(dtype), token_index)
  return gather_by_expert(groups, token_index).astype(dtype)


def combine(expert_out: jax.Array, gates: jax.Array, token_index: jax.Array,
            num_tokens: int, method: str = "gather") -> jax.Array:
  """Gate-weighted expert outputs (E, G, C, d) summed back onto their tokens: (G, N, d) f32."""
  if method == "hybrid":
    empty = jnp.zeros((expert_out.shape[1], num_tokens, 0), expert_out.dtype)
    return _hybrid_combine(expert_out, gates, token_index, empty)
  if method == "einsum":
    return _one_hot_combine(expert_out, gates, token_index, num_tokens)
  weighted = expert_out.astype(jnp.float32) * jnp.swapaxes(gates, 0, 1)[..., None]
  return scatter_add_by_expert(weighted, token_index, num_tokens)


def apply_experts(x: jax.Array, w_in: jax.Array, b_in: jax.Array, w_out: jax.Array,
                  b_out: jax.Array, *, dtype, tensor_axis: str | None = None) -> jax.Array:
  """The stacked GELU expert FFNs as two batched einsums: x (E, ..., d) -> (E, ..., d).

  The expert axis leads, so each expert's rows are one contiguous matrix. ``tensor_axis``:
  inside ``shard_map`` with the hidden width split over that mesh axis, the partial output
  projections are summed across it before the output bias.
  """
  def per_expert(bias):  # (E, k) -> (E, 1, ..., 1, k), broadcasting over x's middle axes
    return bias.astype(dtype).reshape(bias.shape[0], *(1,) * (x.ndim - 2), bias.shape[1])

  h = jnp.einsum("e...d,edh->e...h", x.astype(dtype), w_in.astype(dtype))
  h = nnx.gelu(h + per_expert(b_in), approximate=True)
  y = jnp.einsum("e...h,ehd->e...d", h, w_out.astype(dtype))
  if tensor_axis is not None:
    y = jax.lax.psum(y, tensor_axis)
  return y + per_expert(b_out)


def expert_choice_layer(groups: jax.Array, router_kernel: jax.Array, expert_weights, *,
                        capacity: int, method: str, dtype, exchange=None,
                        tensor_axis: str | None = None, pin=None):
  """One expert-choice layer on (G, N, d) groups: route, dispatch, experts, combine.

  ``exchange`` (None on one device) = (to_experts, from_experts): the all_to_all pair that
  the expert-parallel layer runs around the experts. ``pin`` (None: nothing to pin): a
  function that fixes the sharding of the (E, G, C, d) buffers going into and out of the
  experts. Returns (y (G, N, d) in the groups' dtype, logits (G, N, E) float32, experts per
  token (G, N) int32).
  """
  pin = pin or (lambda x: x)
  logits = router_logits(groups, router_kernel)
  gates, token_index = expert_choice_route(logits, capacity)
  dispatched = pin(dispatch(groups, token_index, method, dtype))
  if exchange is not None:
    dispatched = exchange[0](dispatched)
  out = apply_experts(dispatched, *expert_weights, dtype=dtype, tensor_axis=tensor_axis)
  if exchange is not None:
    out = exchange[1](out)
  out = pin(out)
  y = combine(out, gates, token_index, groups.shape[1], method).astype(groups.dtype)
  return y, logits, expert_counts(token_index, groups.shape[1])


def expert_counts(token_index: jax.Array, num_tokens: int) -> jax.Array:
  """How many experts took each token: (G, E, C) indices -> (G, N) int32 counts."""
  g = token_index.shape[0]
  ones = jnp.ones((g, token_index.shape[1] * token_index.shape[2]), jnp.int32)
  zeros = jnp.zeros((g, num_tokens), jnp.int32)
  return jax.vmap(lambda out, idx, v: out.at[idx].add(v))(
      zeros, token_index.reshape(g, -1), ones)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """Mean squared log-partition of the router logits (ST-MoE); keeps logits from drifting."""
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1)**2)


def routing_stats(counts: jax.Array) -> dict[str, jax.Array]:
  """Fractions of tokens processed by 0, 1 and 2+ experts, and the mean count."""
  counts = counts.astype(jnp.float32)
  return {
      "tokens_0_experts": jnp.mean(counts == 0),
      "tokens_1_expert": jnp.mean(counts == 1),
      "tokens_2plus_experts": jnp.mean(counts >= 2),
      "experts_per_token": jnp.mean(counts),
  }


def token_choice_route(logits: jax.Array, top_k: int, capacity: int):
  """GShard/Switch-style routing: each token picks its top-k experts, experts have C slots.

  Slots are filled in priority order: every token's first choice before any second choice, and
  within a choice rank in token order. A choice that finds its expert full is dropped.
  Returns a dict of (G, N, k) arrays ``expert``, ``gate`` (renormalised over the k choices when
  k > 1), ``slot``, ``kept``, plus ``slot_token`` (G, E, C): the token in each slot, or N (a
  padding row) for an empty slot, and ``scores`` (G, N, E).
  """
  g, n, e = logits.shape
  scores = jax.nn.softmax(logits, axis=-1)
  gate, expert = jax.lax.top_k(scores, top_k)
  if top_k > 1:
    gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
  rank_major = jnp.swapaxes(expert, 1, 2).reshape(g, top_k * n)  # choice rank, then token
  onehot = jax.nn.one_hot(rank_major, e, dtype=jnp.int32)
  slot = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)
  slot = jnp.swapaxes(slot.reshape(g, top_k, n), 1, 2)
  kept = slot < capacity
  token = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, :, None], expert.shape)
  # Dropped choices write out of bounds and are discarded by mode="drop".
  safe_slot = jnp.where(kept, slot, capacity)
  slot_token = jax.vmap(lambda table, ex, sl, tok: table.at[ex, sl].set(tok, mode="drop"))(
      jnp.full((g, e, capacity), n, jnp.int32), expert, safe_slot, token)
  return dict(expert=expert.astype(jnp.int32), gate=gate, slot=slot.astype(jnp.int32),
              kept=kept, slot_token=slot_token, scores=scores)


def token_choice_combine(expert_out: jax.Array, route: dict) -> jax.Array:
  """(G, E, C, d) buffer outputs -> (G, N, d) float32: each token's kept choices, gate-weighted."""
  capacity = expert_out.shape[2]
  picked = jax.vmap(lambda out, ex, sl: out[ex, jnp.minimum(sl, capacity - 1)])(
      expert_out, route["expert"], route["slot"])  # (G, N, k, d)
  weights = jnp.where(route["kept"], route["gate"], 0.0)
  return jnp.sum(picked.astype(jnp.float32) * weights[..., None], axis=2)


def load_balance_loss(scores: jax.Array, expert: jax.Array) -> jax.Array:
  """Switch/GShard auxiliary loss E * sum_e f_e * P_e, averaged over groups.

  f_e: fraction of the N*k routing choices (before dropping) sent to expert e; P_e: mean router
  probability of e. Equals 1 when routing is uniform; grows as it concentrates.
  """
  num_experts = scores.shape[-1]
  fraction = jnp.mean(jax.nn.one_hot(expert, num_experts, dtype=jnp.float32), axis=(1, 2))
  probability = jnp.mean(scores, axis=1)
  return jnp.mean(num_experts * jnp.sum(fraction * probability, axis=-1))

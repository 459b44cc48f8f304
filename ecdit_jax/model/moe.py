"""Mixture-of-experts feed-forward layers: expert-choice (EC-DiT) and the token-choice baseline.

Expert choice (Algorithm 1 of the EC-DiT paper), per routing group of N tokens:
  logits = x W_r (float32);  scores = softmax over the E experts;
  each expert takes the C = round(N f / E) tokens with the highest score for it;
  y = sum over the experts that took a token of score * expert(x).
Every expert processes exactly C tokens, so there is nothing to balance and no auxiliary loss;
a token may be taken by any number of experts (0 .. E), which is how compute adapts per token.

The routing functions below are pure and work on (G, N, ...) arrays of G routing groups; the
modules only hold parameters and reshape the batch into groups. The expert-parallel layer reuses
the same routing, dispatch and combine functions inside ``shard_map``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ecdit_jax.model import hybrid_dispatch
from ecdit_jax.model.config import ModelConfig, expert_capacity
from ecdit_jax.parallel import axes
from ecdit_jax.parallel.mesh import current_mesh


class Experts(nnx.Module):
  """E GELU FFNs (d -> hidden -> d) stored stacked and applied as one batched einsum."""

  def __init__(self, num_experts: int, hidden_size: int, mlp_hidden_size: int, *,
               rngs: nnx.Rngs, dtype, param_dtype):
    init = nnx.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
    zeros = nnx.initializers.zeros_init()
    e, d, h = num_experts, hidden_size, mlp_hidden_size
    self.w_in = nnx.Param(axes.partitioned(init, (axes.EXPERT, axes.EMBED, axes.MLP))(
        rngs.params(), (e, d, h), param_dtype))
    self.b_in = nnx.Param(axes.partitioned(zeros, (axes.EXPERT, axes.MLP))(
        rngs.params(), (e, h), param_dtype))
    self.w_out = nnx.Param(axes.partitioned(init, (axes.EXPERT, axes.MLP, axes.EMBED))(
        rngs.params(), (e, h, d), param_dtype))
    self.b_out = nnx.Param(axes.partitioned(zeros, (axes.EXPERT, axes.EMBED))(
        rngs.params(), (e, d), param_dtype))
    self.dtype = dtype

  def weights(self) -> tuple[jax.Array, ...]:
    return self.w_in[...], self.b_in[...], self.w_out[...], self.b_out[...]

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (..., E, C, d) -> (..., E, C, d): expert e applied to its C tokens."""
    return apply_experts(x, *self.weights(), dtype=self.dtype)


def apply_experts(x: jax.Array, w_in: jax.Array, b_in: jax.Array, w_out: jax.Array,
                  b_out: jax.Array, *, dtype, tensor_axis: str | None = None) -> jax.Array:
  """The stacked expert FFNs as two batched einsums: x (..., E, C, d) -> (..., E, C, d).

  ``tensor_axis``: inside ``shard_map`` with the hidden width split over that mesh axis, the
  partial output projections are summed across it before the output bias.
  """
  h = jnp.einsum("...ecd,edh->...ech", x.astype(dtype), w_in.astype(dtype))
  h = nnx.gelu(h + b_in.astype(dtype)[:, None, :], approximate=True)
  y = jnp.einsum("...ech,ehd->...ecd", h, w_out.astype(dtype))
  if tensor_axis is not None:
    y = jax.lax.psum(y, tensor_axis)
  return y + b_out.astype(dtype)[:, None, :]


class Router(nnx.Module):
  """W_r (d x E); logits are computed in float32 whatever the compute dtype."""

  def __init__(self, hidden_size: int, num_experts: int, *, rngs: nnx.Rngs, param_dtype):
    init = axes.partitioned(nnx.initializers.normal(0.02), (axes.EMBED, axes.UNSHARDED))
    self.kernel = nnx.Param(init(rngs.params(), (hidden_size, num_experts), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("...d,de->...e", x.astype(jnp.float32),
                      self.kernel[...].astype(jnp.float32))


# --- Pure routing functions on (G, N, ...) groups ---------------------------------------------

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
  return jax.vmap(lambda xs, idx: xs[idx])(x, token_index)


def scatter_add_tokens(values: jax.Array, token_index: jax.Array, num_tokens: int) -> jax.Array:
  """values (G, E, C, d) added into (G, N, d) at token_index (G, E, C); float32 accumulation."""
  g, e, c, d = values.shape
  flat_values = values.reshape(g, e * c, d).astype(jnp.float32)
  flat_index = token_index.reshape(g, e * c)
  zeros = jnp.zeros((g, num_tokens, d), jnp.float32)
  return jax.vmap(lambda out, idx, v: out.at[idx].add(v))(zeros, flat_index, flat_values)


def dispatch(groups: jax.Array, token_index: jax.Array, method: str, dtype) -> jax.Array:
  """Each expert's chosen tokens: (G, N, d) -> (G, E, C, d) in ``dtype``.

  "gather" indexes the tokens (its gradient is a scatter-add); "einsum" multiplies by the
  one-hot (G, E, C, N) dispatch mask, a matmul whose gradient is one too (no scatter-add,
  whose atomic additions on GPU round differently from run to run). Dispatch and combine then
  cost 2 x E x C x N x d multiply-adds per group of N tokens, N / 4d of the expert FFNs' (of
  width 4d): 5.6% for XL at 256 tokens a group (one image), growing with the group's size.
  "hybrid" gathers, with the one-hot matmul as its gradient (``hybrid_dispatch``).
  """
  if method == "einsum":
    onehot = jax.nn.one_hot(token_index, groups.shape[1], dtype=dtype)
    return jnp.einsum("gecn,gnd->gecd", onehot, groups.astype(dtype))
  if method == "hybrid":
    return hybrid_dispatch.dispatch(groups.astype(dtype), token_index)
  return gather_tokens(groups, token_index).astype(dtype)


def experts_per_token(token_index: jax.Array, num_tokens: int) -> jax.Array:
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


def load_balance_loss(scores: jax.Array, expert: jax.Array) -> jax.Array:
  """Switch/GShard auxiliary loss E * sum_e f_e * P_e, averaged over groups.

  f_e: fraction of the N*k routing choices (before dropping) sent to expert e; P_e: mean router
  probability of e. Equals 1 when routing is uniform; grows as it concentrates.
  """
  num_experts = scores.shape[-1]
  fraction = jnp.mean(jax.nn.one_hot(expert, num_experts, dtype=jnp.float32), axis=(1, 2))
  probability = jnp.mean(scores, axis=1)
  return jnp.mean(num_experts * jnp.sum(fraction * probability, axis=-1))


def route_groups(groups: jax.Array, router_kernel: jax.Array, capacity: int):
  """(G, N, d) tokens -> float32 logits (G, N, E), gates and token indices (G, E, C)."""
  logits = jnp.einsum("gnd,de->gne", groups.astype(jnp.float32),
                      router_kernel.astype(jnp.float32))
  gates, token_index = expert_choice_route(logits, capacity)
  return logits, gates, token_index


def combine(expert_out: jax.Array, gates: jax.Array, token_index: jax.Array,
            num_tokens: int, method: str = "gather") -> jax.Array:
  """Gate-weighted expert outputs (G, E, C, d) summed back onto their tokens: (G, N, d) f32.

  "gather" scatter-adds in float32; "einsum" multiplies by the gate-weighted one-hot mask in
  the outputs' dtype, accumulating in float32 (see ``dispatch``); "hybrid" does the same with
  gathers for its gradients (``hybrid_dispatch``).
  """
  if method == "hybrid":
    return hybrid_dispatch.combine(expert_out, gates, token_index, num_tokens)
  if method == "einsum":
    dtype = expert_out.dtype
    weights = jax.nn.one_hot(token_index, num_tokens, dtype=jnp.float32) * gates[..., None]
    return jnp.einsum("gecn,gecd->gnd", weights.astype(dtype), expert_out,
                      preferred_element_type=jnp.float32)
  weighted = expert_out.astype(jnp.float32) * gates[..., None]
  return scatter_add_tokens(weighted, token_index, num_tokens)


# --- Modules ------------------------------------------------------------------------------------

def to_groups(x: jax.Array, group_size: int) -> jax.Array:
  b, s, d = x.shape
  if b % group_size:
    raise ValueError(f"the batch of {b} images is not divisible by "
                     f"config.model.routing_group_size={group_size}")
  return x.reshape(b // group_size, group_size * s, d)


class _RoutedFFN(nnx.Module):
  """Parameters shared by both routers: W_r and the E experts."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.router = Router(config.hidden_size, config.num_experts, rngs=rngs,
                         param_dtype=config.parameter_dtype)
    self.experts = Experts(config.num_experts, config.hidden_size, config.mlp_hidden_size,
                           rngs=rngs, dtype=config.compute_dtype,
                           param_dtype=config.parameter_dtype)


class ExpertChoiceFFN(_RoutedFFN):
  """The EC-DiT MoE layer: router + E experts, expert-choice top-C routing per group."""

  def capacity(self, group_tokens: int, capacity_factor: float) -> int:
    capacity = expert_capacity(group_tokens, capacity_factor, self.config.num_experts)
    if capacity < 1:
      raise ValueError(f"capacity factor {capacity_factor} leaves each of the "
                       f"{self.config.num_experts} experts < 1 of {group_tokens} tokens")
    return capacity

  def __call__(self, x: jax.Array, *, train: bool = True,
               capacity_factor: float | None = None) -> tuple[jax.Array, dict]:
    cfg = self.config
    if capacity_factor is None:
      capacity_factor = cfg.capacity_factor if train else cfg.eval_capacity_factor
    b, s, d = x.shape
    capacity = self.capacity(cfg.routing_group_size * s, capacity_factor)
    mesh = current_mesh()
    if mesh is not None and mesh.shape["expert"] > 1:
      # Expert parallelism: route locally, exchange per-expert buffers with all_to_all.
      from ecdit_jax.model import expert_parallel  # pylint: disable=import-outside-toplevel
      y, logits, counts = expert_parallel.expert_choice_ffn(
          x, self.router.kernel[...], self.experts.weights(), mesh=mesh, capacity=capacity,
          group_size=cfg.routing_group_size, dtype=cfg.compute_dtype, method=cfg.moe_dispatch)
    else:
      groups = to_groups(x, cfg.routing_group_size)
      logits, gates, token_index = route_groups(groups, self.router.kernel[...], capacity)
      dispatched = dispatch(groups, token_index, cfg.moe_dispatch, cfg.compute_dtype)
      expert_out = self.experts(dispatched)
      y = combine(expert_out, gates, token_index, groups.shape[1], cfg.moe_dispatch)
      y = y.astype(x.dtype)
      y = y.reshape(b, s, d)
      counts = experts_per_token(token_index, groups.shape[1])
    z_loss = router_z_loss(logits)
    aux = routing_stats(counts)
    aux.update(router_z_loss=z_loss, load_balance_loss=jnp.zeros((), jnp.float32),
               aux_loss=cfg.router_z_loss_weight * z_loss, token_counts=counts.reshape(b, s))
    return y, aux


class TokenChoiceFFN(_RoutedFFN):
  """The token-choice top-k baseline with capacity, dropping and the load-balancing loss."""

  def capacity(self, group_tokens: int, capacity_factor: float) -> int:
    cfg = self.config
    per_expert = group_tokens * cfg.token_choice_top_k * capacity_factor / cfg.num_experts
    return max(1, min(group_tokens, int(per_expert + 0.5)))

  def __call__(self, x: jax.Array, *, train: bool = True,
               capacity_factor: float | None = None) -> tuple[jax.Array, dict]:
    del train  # the token-choice buffer size is the same for training and inference
    cfg = self.config
    if capacity_factor is None:
      capacity_factor = cfg.token_choice_capacity_factor
    b, s, d = x.shape
    groups = to_groups(x, cfg.routing_group_size)
    n = groups.shape[1]
    logits = self.router(groups)
    route = token_choice_route(logits, cfg.token_choice_top_k, self.capacity(n, capacity_factor))
    padded = jnp.pad(groups, ((0, 0), (0, 1), (0, 0)))  # row n: zeros for empty slots
    expert_out = self.experts(gather_tokens(padded, route["slot_token"]))  # (G, E, C, d)
    capacity = expert_out.shape[2]
    picked = jax.vmap(lambda out, ex, sl: out[ex, jnp.minimum(sl, capacity - 1)])(
        expert_out, route["expert"], route["slot"])  # (G, N, k, d)
    weights = jnp.where(route["kept"], route["gate"], 0.0)
    y = jnp.sum(picked.astype(jnp.float32) * weights[..., None], axis=2)
    y = y.astype(x.dtype).reshape(b, s, d)
    z_loss = router_z_loss(logits)
    lb_loss = load_balance_loss(route["scores"], route["expert"])
    counts = jnp.sum(route["kept"], axis=-1, dtype=jnp.int32)
    aux = routing_stats(counts)
    aux.update(router_z_loss=z_loss, load_balance_loss=lb_loss,
               aux_loss=cfg.router_z_loss_weight * z_loss + cfg.load_balance_loss_weight * lb_loss,
               token_counts=counts.reshape(b, s))
    return y, aux

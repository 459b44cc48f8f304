"""Mixture-of-experts feed-forward layers: expert choice (EC-DiT) and the token-choice baseline.

The layers hold the parameters (the router W_r and E stacked GELU experts) and reshape the batch
into routing groups; the routing itself is the pure functions of ``model/routing.py``. Whether
a layer runs expert-parallel is decided when it is built: given a mesh whose ``expert`` axis is
larger than 1, the expert-choice layer runs under ``shard_map`` (``model/expert_parallel.py``);
otherwise it runs as one program that XLA partitions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ecdit_jax.model import expert_parallel, routing
from ecdit_jax.model.config import ModelConfig
from ecdit_jax.parallel import axes
from ecdit_jax.parallel import mesh as mesh_lib


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
    """x (G, E, C, d) -> (G, E, C, d): expert e applied to its C tokens."""
    y = routing.apply_experts(jnp.swapaxes(x, 0, 1), *self.weights(), dtype=self.dtype)
    return jnp.swapaxes(y, 0, 1)


class Router(nnx.Module):
  """W_r (d x E); logits are computed in float32 whatever the compute dtype."""

  def __init__(self, hidden_size: int, num_experts: int, *, rngs: nnx.Rngs, param_dtype):
    init = axes.partitioned(nnx.initializers.normal(0.02), (axes.EMBED, axes.UNSHARDED))
    self.kernel = nnx.Param(init(rngs.params(), (hidden_size, num_experts), param_dtype))

  def __call__(self, groups: jax.Array) -> jax.Array:
    return routing.router_logits(groups, self.kernel[...])


class _RoutedFFN(nnx.Module):
  """Parameters shared by both routers: W_r and the E experts."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.router = Router(config.hidden_size, config.num_experts, rngs=rngs,
                         param_dtype=config.parameter_dtype)
    self.experts = Experts(config.num_experts, config.hidden_size, config.mlp_hidden_size,
                           rngs=rngs, dtype=config.compute_dtype,
                           param_dtype=config.parameter_dtype)

  def _aux(self, logits, counts, shape, load_balance=None) -> dict:
    cfg = self.config
    z_loss = routing.router_z_loss(logits)
    aux_loss = cfg.router_z_loss_weight * z_loss
    if load_balance is None:
      load_balance = jnp.zeros((), jnp.float32)
    else:
      aux_loss = aux_loss + cfg.load_balance_loss_weight * load_balance
    aux = routing.routing_stats(counts)
    aux.update(router_z_loss=z_loss, load_balance_loss=load_balance, aux_loss=aux_loss,
               token_counts=counts.reshape(shape))
    return aux


class ExpertChoiceFFN(_RoutedFFN):
  """The EC-DiT MoE layer: router + E experts, expert-choice top-C routing per group.

  ``mesh``: the device mesh the layer runs on; with an ``expert`` axis larger than 1 the layer
  is expert-parallel (``expert_parallel.expert_choice_ffn``).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, mesh=None):
    super().__init__(config, rngs=rngs)
    self.expert_mesh = mesh if mesh is not None and mesh.shape["expert"] > 1 else None
    self.mesh = mesh

  def __call__(self, x: jax.Array, *, train: bool = True,
               capacity_factor: float | None = None) -> tuple[jax.Array, dict]:
    cfg = self.config
    b, s, d = x.shape
    capacity = cfg.moe_capacity(cfg.routing_group_size * s, train=train,
                                capacity_factor=capacity_factor)
    weights = (self.router.kernel[...], self.experts.weights())
    if self.expert_mesh is not None:
      y, logits, counts = expert_parallel.expert_choice_ffn(
          x, *weights, mesh=self.expert_mesh, capacity=capacity,
          group_size=cfg.routing_group_size, dtype=cfg.compute_dtype, method=cfg.moe_dispatch)
    else:
      # The experts' buffers, (E, G, C, d), pinned to groups split like the batch: left to
      # propagation, on a data x fsdp x tensor mesh XLA (jax 0.10) split them by width over
      # tensor as well, and the partitioned program computed wrong outputs
      # (tests/parallel/test_mesh.py::test_sharded_forward_equals_unsharded).
      pin = functools.partial(mesh_lib.constrain, names=(None, mesh_lib.BATCH, None, None),
                              mesh=self.mesh)
      y, logits, counts = routing.expert_choice_layer(
          routing.to_groups(x, cfg.routing_group_size), *weights, capacity=capacity,
          method=cfg.moe_dispatch, dtype=cfg.compute_dtype, pin=pin)
      y = y.reshape(b, s, d)
    return y, self._aux(logits, counts, (b, s))


class TokenChoiceFFN(_RoutedFFN):
  """The token-choice top-k baseline with capacity, dropping and the load-balancing loss."""

  def __call__(self, x: jax.Array, *, train: bool = True,
               capacity_factor: float | None = None) -> tuple[jax.Array, dict]:
    cfg = self.config
    b, s, d = x.shape
    groups = routing.to_groups(x, cfg.routing_group_size)
    capacity = cfg.moe_capacity(groups.shape[1], train=train, capacity_factor=capacity_factor)
    logits = self.router(groups)
    route = routing.token_choice_route(logits, cfg.token_choice_top_k, capacity)
    padded = jnp.pad(groups, ((0, 0), (0, 1), (0, 0)))  # row N: zeros for empty slots
    expert_out = self.experts(routing.gather_tokens(padded, route["slot_token"]))
    y = routing.token_choice_combine(expert_out, route).astype(x.dtype).reshape(b, s, d)
    counts = jnp.sum(route["kept"], axis=-1, dtype=jnp.int32)
    return y, self._aux(logits, counts, (b, s),
                        routing.load_balance_loss(route["scores"], route["expert"]))

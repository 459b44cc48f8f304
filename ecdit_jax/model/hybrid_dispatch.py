"""Dispatch and combine that index in one direction and multiply by one-hots in the other.

Moving tokens to experts by index is cheap (a gather), but its gradient is a scatter-add, whose
atomic additions on GPU are slow and round differently from run to run; moving them by one-hot
matmuls costs a small matmul each way. Each operation here takes the cheap direction of both:

- dispatch: gather forward; the gradient back onto the tokens is the one-hot matmul.
- combine: the gate-weighted one-hot matmul forward; its gradients (to the expert outputs and
  to the gates) only need each chosen token's output gradient, a gather.

So a training step runs two one-hot matmuls per MoE layer instead of the five of "einsum"
dispatch (forward 2, backward 3), and no scatter-add. Shapes as in ``moe.dispatch`` and
``moe.combine``: groups (G, N, d), token_index and gates (G, E, C), expert outputs (G, E, C, d).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _take(groups: jax.Array, token_index: jax.Array) -> jax.Array:
  # moe.gather_tokens, restated here because moe imports this module.
  return jax.vmap(lambda rows, index: rows[index])(groups, token_index)


# A zero-size array of the groups' shape carries N to the backward passes as a static shape.

@jax.custom_vjp
def dispatch(groups: jax.Array, token_index: jax.Array) -> jax.Array:
  """(G, N, d) -> (G, E, C, d): each expert's chosen tokens, in the groups' dtype."""
  return _take(groups, token_index)


def _dispatch_forward(groups, token_index):
  return _take(groups, token_index), (token_index, groups[:, :, :0])


def _dispatch_backward(residuals, cotangent):
  token_index, empty = residuals
  onehot = jax.nn.one_hot(token_index, empty.shape[1], dtype=cotangent.dtype)
  grad = jnp.einsum("gecn,gecd->gnd", onehot, cotangent, preferred_element_type=jnp.float32)
  return grad.astype(empty.dtype), None


dispatch.defvjp(_dispatch_forward, _dispatch_backward)


def _combine(expert_out, gates, token_index, empty):
  weights = jax.nn.one_hot(token_index, empty.shape[1], dtype=jnp.float32) * gates[..., None]
  return jnp.einsum("gecn,gecd->gnd", weights.astype(expert_out.dtype), expert_out,
                    preferred_element_type=jnp.float32)


@jax.custom_vjp
def _combine_op(expert_out, gates, token_index, empty):
  return _combine(expert_out, gates, token_index, empty)


def _combine_forward(expert_out, gates, token_index, empty):
  return (_combine(expert_out, gates, token_index, empty),
          (expert_out, gates, token_index, empty))


def _combine_backward(residuals, cotangent):
  expert_out, gates, token_index, empty = residuals
  picked = _take(cotangent, token_index)  # (G, E, C, d) float32: d loss / d output per choice
  grad_out = (picked * gates[..., None]).astype(expert_out.dtype)
  grad_gates = jnp.sum(picked * expert_out.astype(jnp.float32), axis=-1)
  # The gates came out of top_k, whose gradient scatters these (G, E, C) values into (G, E, N).
  # Left to itself XLA fuses this reduction over d into that scatter, and the fused kernel took
  # 3.1 ms of a 229 ms EC-XL-8E step on one H100. The barrier keeps them apart.
  grad_gates = jax.lax.optimization_barrier(grad_gates)
  return grad_out, grad_gates.astype(gates.dtype), None, None


_combine_op.defvjp(_combine_forward, _combine_backward)


def combine(expert_out: jax.Array, gates: jax.Array, token_index: jax.Array,
            num_tokens: int) -> jax.Array:
  """Gate-weighted expert outputs (G, E, C, d) summed onto their tokens: (G, N, d) float32.

  The gates are rounded to the outputs' dtype for the matmul, which accumulates in float32."""
  empty = jnp.zeros((expert_out.shape[0], num_tokens, 0), expert_out.dtype)
  return _combine_op(expert_out, gates, token_index, empty)

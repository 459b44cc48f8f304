"""The token-choice top-k baseline: routing, capacity dropping, load-balancing loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ecdit_jax.model import moe, routing

from tests.tiny import tiny_model_config


def test_all_tokens_prefer_one_expert_overflow_is_dropped_in_token_order():
  # 6 tokens, 3 experts, top-1, capacity 2: everyone wants expert 0.
  logits = jnp.tile(jnp.array([[[5.0, 0.0, -5.0]]]), (1, 6, 1))
  route = routing.token_choice_route(logits, top_k=1, capacity=2)
  np.testing.assert_array_equal(route["expert"][0, :, 0], 0)
  np.testing.assert_array_equal(route["kept"][0, :, 0], [1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(route["slot_token"][0, 0], [0, 1])
  np.testing.assert_array_equal(route["slot_token"][0, 1:], 6)  # empty slots point at padding


def test_first_choices_fill_before_second_choices():
  # Token 0 wants (0, 1); token 1 wants (1, 0). Capacity 1: both first choices win.
  logits = jnp.array([[[2.0, 1.0], [1.0, 2.0]]])
  route = routing.token_choice_route(logits, top_k=2, capacity=1)
  np.testing.assert_array_equal(route["expert"][0], [[0, 1], [1, 0]])
  np.testing.assert_array_equal(route["kept"][0], [[True, False], [True, False]])
  np.testing.assert_allclose(route["gate"].sum(-1), 1.0, rtol=1e-6)  # renormalised over k


def test_load_balance_loss_hand_checked():
  # Both tokens send their only choice to expert 0 with probability 0.9:
  # f = (1, 0), P = (0.9, 0.1) -> E * sum f P = 2 * 0.9.
  scores = jnp.array([[[0.9, 0.1], [0.9, 0.1]]])
  expert = jnp.array([[[0], [0]]])
  np.testing.assert_allclose(routing.load_balance_loss(scores, expert), 1.8, rtol=1e-6)
  # Perfectly uniform routing gives exactly 1.
  scores = jnp.full((1, 4, 2), 0.5)
  expert = jnp.array([[[0], [1], [0], [1]]])
  np.testing.assert_allclose(routing.load_balance_loss(scores, expert), 1.0, rtol=1e-6)


def reference_token_choice(x, layer, capacity):
  """Loop-by-loop top-k routing with dropping, written with numpy."""
  config = layer.config
  x = np.asarray(x, np.float64)
  w_r = np.asarray(layer.router.kernel[...], np.float64)
  w_in, b_in = np.asarray(layer.experts.w_in[...]), np.asarray(layer.experts.b_in[...])
  w_out, b_out = np.asarray(layer.experts.w_out[...]), np.asarray(layer.experts.b_out[...])
  k = config.token_choice_top_k
  y = np.zeros_like(x)
  for b in range(x.shape[0]):
    logits = x[b] @ w_r
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    choices = np.argsort(-probs, axis=-1)[:, :k]
    load = np.zeros(config.num_experts, int)
    kept = np.zeros_like(choices, bool)
    for rank in range(k):
      for token in range(x.shape[1]):
        e = choices[token, rank]
        if load[e] < capacity:
          kept[token, rank] = True
          load[e] += 1
    for token in range(x.shape[1]):
      gates = probs[token, choices[token]]
      gates = gates / gates.sum()
      for rank in range(k):
        if kept[token, rank]:
          e = choices[token, rank]
          h = np.asarray(jax.nn.gelu(x[b, token] @ w_in[e] + b_in[e], approximate=True))
          y[b, token] += gates[rank] * (h @ w_out[e] + b_out[e])
  return y


@pytest.mark.parametrize("factor", [0.5, 1.25])
def test_forward_matches_loop_reference(factor):
  config = tiny_model_config(router="token_choice", token_choice_top_k=2,
                             token_choice_capacity_factor=factor)
  layer = moe.TokenChoiceFFN(config, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 16, config.hidden_size))
  y, aux = layer(x)
  capacity = {0.5: 4, 1.25: 10}[factor]  # k f S / E slots: 2 x f x 16 / 4, rounded
  np.testing.assert_allclose(y, reference_token_choice(x, layer, capacity), rtol=1e-4, atol=1e-5)
  if factor < 1:  # buffers of 4 slots x 4 experts cannot hold 32 choices: some are dropped
    assert float(aux["experts_per_token"]) < 2.0
  assert aux["load_balance_loss"] >= 1.0 - 1e-6  # E * sum f P >= 1 when f and P agree
  np.testing.assert_allclose(aux["aux_loss"], 0.01 * aux["load_balance_loss"], rtol=1e-6)

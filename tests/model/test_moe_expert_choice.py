"""Expert-choice MoE against an independent straight-line reference of Algorithm 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tests.tiny import tiny_model_config

from ecdit_jax.model import expert_capacity, moe, routing
from ecdit_jax.model.layers import FeedForward


def reference_expert_choice(x, router_w, w_in, b_in, w_out, b_out, capacity_factor, group):
  """Algorithm 1 written out with one-hot dispatch/combine einsums (no gather, no scatter)."""
  b, s, d = x.shape
  e = router_w.shape[1]
  xg = x.reshape(b // group, group * s, d)
  n = xg.shape[1]
  scores = jax.nn.softmax(jnp.einsum("gnd,de->gne", xg, router_w), axis=-1)
  capacity = min(n, int(np.floor(n * capacity_factor / e + 0.5)))
  # Top-C per expert via a full descending sort, independent of lax.top_k.
  order = jnp.argsort(-jnp.swapaxes(scores, 1, 2), axis=-1)[..., :capacity]  # (G, E, C)
  dispatch = jax.nn.one_hot(order, n)  # (G, E, C, N)
  gates = jnp.einsum("gecn,gne->gec", dispatch, scores)
  x_in = jnp.einsum("gecn,gnd->gecd", dispatch, xg)
  hidden = jax.nn.gelu(jnp.einsum("gecd,edh->gech", x_in, w_in) + b_in[None, :, None],
                       approximate=True)
  x_out = jnp.einsum("gech,ehd->gecd", hidden, w_out) + b_out[None, :, None]
  y = jnp.einsum("gecn,gec,gecd->gnd", dispatch, gates, x_out)
  return y.reshape(b, s, d)


def make_layer(**overrides):
  config = tiny_model_config(**overrides)
  return moe.ExpertChoiceFFN(config, rngs=nnx.Rngs(0)), config


def layer_weights(layer):
  return (layer.router.kernel[...], layer.experts.w_in[...], layer.experts.b_in[...],
          layer.experts.w_out[...], layer.experts.b_out[...])


def randomize_biases(layer, seed=1):
  # Zero-initialised biases would hide bias-handling bugs.
  k1, k2 = jax.random.split(jax.random.key(seed))
  layer.experts.b_in[...] = 0.1 * jax.random.normal(k1, layer.experts.b_in[...].shape)
  layer.experts.b_out[...] = 0.1 * jax.random.normal(k2, layer.experts.b_out[...].shape)


@pytest.mark.parametrize("method", ["gather", "einsum", "hybrid"])
@pytest.mark.parametrize("group,factor", [(1, 2.0), (2, 2.0), (1, 1.0), (4, 0.5)])
def test_forward_matches_reference(group, factor, method):
  layer, config = make_layer(routing_group_size=group, capacity_factor=factor,
                             moe_dispatch=method)
  randomize_biases(layer)
  x = jax.random.normal(jax.random.key(2), (4, 16, config.hidden_size))
  y, _ = layer(x, train=True)
  expected = reference_expert_choice(x, *layer_weights(layer), factor, group)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["gather", "einsum", "hybrid"])
def test_gradients_match_reference(method):
  layer, config = make_layer(routing_group_size=2, moe_dispatch=method)
  randomize_biases(layer)
  x = jax.random.normal(jax.random.key(3), (4, 16, config.hidden_size))
  cotangent = jax.random.normal(jax.random.key(4), x.shape)

  graphdef, params = nnx.split(layer)

  def ours(params, x):
    y, _ = nnx.merge(graphdef, params)(x, train=True)
    return jnp.sum(y * cotangent)

  def reference(weights, x):
    return jnp.sum(reference_expert_choice(x, *weights, 2.0, 2) * cotangent)

  grads, grad_x = jax.grad(ours, argnums=(0, 1))(params, x)
  ref_grads, ref_grad_x = jax.grad(reference, argnums=(0, 1))(layer_weights(layer), x)
  np.testing.assert_allclose(grad_x, ref_grad_x, rtol=1e-4, atol=1e-5)
  ours_flat = (grads["router"]["kernel"][...], grads["experts"]["w_in"][...],
               grads["experts"]["b_in"][...], grads["experts"]["w_out"][...],
               grads["experts"]["b_out"][...])
  for got, want in zip(ours_flat, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The router must receive gradient through the gates (that is how it learns).
  assert float(jnp.abs(ours_flat[0]).max()) > 0


def test_every_expert_takes_exactly_capacity_tokens():
  logits = jax.random.normal(jax.random.key(5), (3, 20, 4))
  capacity = expert_capacity(20, 2.0, 4)
  gates, token_index = routing.expert_choice_route(logits, capacity)
  assert token_index.shape == (3, 4, capacity) == gates.shape
  for g in range(3):
    for e in range(4):
      chosen = np.asarray(token_index[g, e])
      assert len(set(chosen.tolist())) == capacity  # C distinct tokens
      scores = np.asarray(jax.nn.softmax(logits[g], axis=-1))[:, e]
      # ... and they are that expert's C best-scoring tokens.
      np.testing.assert_array_equal(np.sort(chosen), np.sort(np.argsort(-scores)[:capacity]))
  counts = routing.expert_counts(token_index, 20)
  assert int(counts.sum()) == 3 * 4 * capacity


def test_capacity_rounding_and_limits():
  assert expert_capacity(256, 2.0, 8) == 64
  assert expert_capacity(10, 1.0, 4) == 3  # 2.5 rounds up
  assert expert_capacity(16, 8.0, 2) == 16  # clipped to the group: an expert sees each token once
  assert expert_capacity(4, 0.1, 8) == 0  # too small; the config check rejects it


def test_per_image_routing_ignores_batch_mates():
  layer, config = make_layer(routing_group_size=1)
  x = jax.random.normal(jax.random.key(6), (3, 16, config.hidden_size))
  other = x.at[1:].set(jax.random.normal(jax.random.key(7), (2, 16, config.hidden_size)))
  y1, _ = layer(x)
  y2, _ = layer(other)
  np.testing.assert_array_equal(y1[0], y2[0])


def test_grouped_routing_couples_images_in_a_group():
  layer, config = make_layer(routing_group_size=2)
  x = jax.random.normal(jax.random.key(6), (2, 16, config.hidden_size))
  other = x.at[1].set(10.0 * jax.random.normal(jax.random.key(7), (16, config.hidden_size)))
  y1, _ = layer(x)
  y2, _ = layer(other)
  assert not np.allclose(y1[0], y2[0])


def test_single_expert_with_full_capacity_is_the_dense_ffn():
  layer, config = make_layer(num_experts=1, capacity_factor=1.0)
  randomize_biases(layer)
  dense = FeedForward(config.hidden_size, config.mlp_hidden_size, rngs=nnx.Rngs(1),
                      dtype=jnp.float32, param_dtype=jnp.float32)
  dense.fc1.kernel[...] = layer.experts.w_in[...][0]
  dense.fc1.bias[...] = layer.experts.b_in[...][0]
  dense.fc2.kernel[...] = layer.experts.w_out[...][0]
  dense.fc2.bias[...] = layer.experts.b_out[...][0]
  x = jax.random.normal(jax.random.key(8), (2, 16, config.hidden_size))
  y, aux = layer(x)
  np.testing.assert_allclose(y, dense(x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["experts_per_token"], 1.0)


def test_permuting_tokens_permutes_output():
  layer, config = make_layer()
  x = jax.random.normal(jax.random.key(9), (2, 16, config.hidden_size))
  perm = np.random.default_rng(0).permutation(16)
  y, _ = layer(x)
  y_perm, _ = layer(x[:, perm])
  np.testing.assert_allclose(y_perm, y[:, perm], rtol=1e-5, atol=1e-6)


def test_inference_capacity_factor_sets_the_work_done():
  layer, config = make_layer(capacity_factor=2.0, eval_capacity_factor=1.0)
  x = jax.random.normal(jax.random.key(10), (2, 16, config.hidden_size))
  _, train_aux = layer(x, train=True)
  _, eval_aux = layer(x, train=False)
  _, sweep_aux = layer(x, train=False, capacity_factor=4.0)
  # Mean experts per token = E * C / N = the capacity factor (16 tokens, 4 experts).
  np.testing.assert_allclose(train_aux["experts_per_token"], 2.0)
  np.testing.assert_allclose(eval_aux["experts_per_token"], 1.0)
  np.testing.assert_allclose(sweep_aux["experts_per_token"], 4.0)
  fractions = sum(float(train_aux[k]) for k in
                  ("tokens_0_experts", "tokens_1_expert", "tokens_2plus_experts"))
  assert fractions == pytest.approx(1.0)


def test_bf16_compute_keeps_router_in_float32():
  layer, config = make_layer(dtype="bfloat16")
  x = jax.random.normal(jax.random.key(11), (2, 16, config.hidden_size)).astype(jnp.bfloat16)
  logits = layer.router(x.reshape(1, 32, -1))
  assert logits.dtype == jnp.float32
  y, _ = layer(x)
  assert y.dtype == jnp.bfloat16
  expected = reference_expert_choice(x.astype(jnp.float32), *layer_weights(layer), 2.0, 1)
  np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=0.05, atol=0.05)


def test_router_z_loss_weight_enters_aux_loss():
  layer, config = make_layer(router_z_loss_weight=0.5)
  x = jax.random.normal(jax.random.key(12), (2, 16, config.hidden_size))
  _, aux = layer(x)
  logits = layer.router(x)
  expected = jnp.mean(jax.nn.logsumexp(logits, axis=-1)**2)
  np.testing.assert_allclose(aux["router_z_loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(aux["aux_loss"], 0.5 * expected, rtol=1e-5)


def test_batch_not_divisible_by_group_names_the_key():
  layer, config = make_layer(routing_group_size=2)
  x = jnp.zeros((3, 16, config.hidden_size))
  with pytest.raises(ValueError, match="routing_group_size"):
    layer(x)


def test_dispatch_methods_agree_in_bf16():
  """The one-hot einsums move the same bf16 values as the gather; combining rounds the gates
  to bf16 (the gather path weights in float32), so outputs agree to bf16 precision."""
  outputs = {}
  for method in ("gather", "einsum", "hybrid"):
    layer, config = make_layer(dtype="bfloat16", moe_dispatch=method)
    randomize_biases(layer)
    x = jax.random.normal(jax.random.key(6), (2, 16, config.hidden_size))
    outputs[method] = np.asarray(layer(x, train=True)[0], np.float32)
  np.testing.assert_allclose(outputs["einsum"], outputs["gather"], rtol=2e-2, atol=2e-2)
  np.testing.assert_array_equal(outputs["hybrid"], outputs["einsum"])  # the same forward matmul


def test_unknown_dispatch_method_names_the_key():
  from ecdit_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=r"config\.model\.moe_dispatch='scatter'"):
    tiny_model_config(moe_dispatch="scatter")


@pytest.mark.parametrize("method", ["gather", "einsum", "hybrid"])
def test_dispatch_is_expert_major(method):
  """Every method hands the experts (E, G, C, d): expert e's C chosen tokens of group g."""
  k1, k2 = jax.random.split(jax.random.key(8))
  groups = jax.random.normal(k1, (3, 12, 8))
  _, token_index = routing.expert_choice_route(jax.random.normal(k2, (3, 12, 4)), 5)
  got = routing.dispatch(groups, token_index, method, jnp.float32)
  want = np.stack([[np.asarray(groups)[g][np.asarray(token_index)[g, e]] for g in range(3)]
                   for e in range(4)])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_hybrid_dispatch_and_combine_have_the_einsum_gradients():
  """The custom gradients of ``hybrid`` (one-hot matmul back through the gather, gathers back
  through the combine) equal autodiff through the one-hot einsums, for tokens, expert outputs
  and gates, in float32."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(7), 4)
  groups = jax.random.normal(k1, (3, 12, 8))
  gates, token_index = routing.expert_choice_route(jax.random.normal(k2, (3, 12, 4)), 5)
  head = jax.random.normal(k3, (4, 8, 8))  # a per-expert map between dispatch and combine
  cotangent = jax.random.normal(k4, (3, 12, 8))

  def through(method, groups, gates):
    out = routing.dispatch(groups, token_index, method, jnp.float32)
    out = jnp.einsum("egcd,edf->egcf", out, head)
    return jnp.sum(routing.combine(out, gates, token_index, 12, method) * cotangent)

  want = jax.grad(lambda *a: through("einsum", *a), argnums=(0, 1))(groups, gates)
  got = jax.jit(jax.grad(lambda *a: through("hybrid", *a), argnums=(0, 1)))(groups, gates)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)

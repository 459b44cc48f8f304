"""The DiT backbone and the text-to-image model: shapes, adaLN-Zero, masking, conditioning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ecdit_jax.model import TextToImageDiT, layers
from ecdit_jax.model.text import TextEncoder

from tests.tiny import tiny_model_config


def inputs(config, batch=2, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (batch, config.image_size, config.image_size, config.in_channels))
  t = jax.random.uniform(k2, (batch,))
  tokens = jnp.array([[5, 6, 7, 1, 0, 0, 0, 0], [9, 1, 0, 0, 0, 0, 0, 0]])[:batch]
  return x, t, tokens


def perturb_all_params(model, seed=3, scale=0.05):
  """Replaces zero-initialised weights so that every branch is active."""
  graphdef, params = nnx.split(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))


@pytest.mark.parametrize("layout,router", [("every_other", "expert_choice"),
                                           ("every", "expert_choice"),
                                           ("every_other", "token_choice"), ("none", None)])
def test_output_shapes_and_aux(layout, router):
  config = tiny_model_config(num_layers=2, moe_layout=layout, router=router or "expert_choice")
  model = TextToImageDiT(config, rngs=nnx.Rngs(0))
  x, t, tokens = inputs(config)
  out, aux = model(x, t, tokens)
  assert out.shape == x.shape and out.dtype == jnp.float32
  moe_layers = {"every_other": 1, "every": 2, "none": 0}[layout]
  assert config.moe_layer_indices == {"every_other": (1,), "every": (0, 1), "none": ()}[layout]
  for value in aux["moe"].values():
    assert value.shape == (moe_layers,)
  assert aux["aux_loss"].shape == ()


def test_adaln_zero_initialisation_outputs_zero():
  config = tiny_model_config()
  model = TextToImageDiT(config, rngs=nnx.Rngs(0))
  out, _ = model(*inputs(config))
  np.testing.assert_array_equal(out, 0.0)


def test_token_masking_returns_kept_patch_tokens():
  config = tiny_model_config()
  model = TextToImageDiT(config, rngs=nnx.Rngs(0))
  perturb_all_params(model)
  x, t, tokens = inputs(config)
  keep = jnp.array([[0, 3, 5, 9], [1, 2, 14, 15]])
  out, aux = model(x, t, tokens, keep_index=keep)
  assert out.shape == (2, 4, config.patch_dim)
  # Routing saw only the kept tokens: 4 tokens, 4 experts, f=2 -> capacity 2 each.
  np.testing.assert_allclose(aux["moe"]["experts_per_token"], 2.0)


def test_images_in_a_batch_are_independent_with_per_image_routing():
  config = tiny_model_config(num_layers=4)
  model = TextToImageDiT(config, rngs=nnx.Rngs(0))
  perturb_all_params(model)
  x, t, tokens = inputs(config)
  out, _ = model(x, t, tokens)
  out_alone, _ = model(x[:1], t[:1], tokens[:1])
  np.testing.assert_allclose(out[:1], out_alone, rtol=1e-5, atol=1e-5)


def test_padding_tokens_do_not_change_the_output():
  config = tiny_model_config()
  model = TextToImageDiT(config, rngs=nnx.Rngs(0))
  perturb_all_params(model)
  x, t, tokens = inputs(config)
  out, _ = model(x, t, tokens)
  # Different garbage beyond each sequence's length (after its eos) must be ignored.
  garbage = jnp.where(tokens == 0, 0, tokens)
  garbage = garbage.at[0, 5:].set(0).at[1, 2:].set(0)
  out2, _ = model(x, t, garbage)
  np.testing.assert_array_equal(out, out2)
  encoder = model.text_encoder
  emb, lengths = encoder(tokens)
  np.testing.assert_array_equal(lengths, [4, 2])
  # A prompt with a different word changes the prediction (text conditioning is live).
  out3, _ = model(x, t, tokens.at[0, 0].set(11))
  assert not np.allclose(out[0], out3[0])
  np.testing.assert_allclose(out[1], out3[1], rtol=1e-5, atol=1e-6)


def test_timestep_changes_the_prediction():
  config = tiny_model_config()
  model = TextToImageDiT(config, rngs=nnx.Rngs(0))
  perturb_all_params(model)
  x, t, tokens = inputs(config)
  out1, _ = model(x, t, tokens)
  out2, _ = model(x, t + 0.1, tokens)
  assert not np.allclose(out1, out2)


def test_bfloat16_compute_with_float32_params():
  config = tiny_model_config(dtype="bfloat16")
  model = TextToImageDiT(config, rngs=nnx.Rngs(0))
  perturb_all_params(model)
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.float32
  out, _ = model(*inputs(config))
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


def test_grouped_query_attention_equals_repeated_kv_heads():
  from ecdit_jax.model.attention import Attention
  attn = Attention(32, 4, 2, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(1), (2, 5, 32))
  q, k, v = attn.query(x), attn.key(x), attn.value(x)
  k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)  # head h uses kv head h // 2
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
  expected = attn.out(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v))
  np.testing.assert_allclose(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_patchify_layout_and_round_trip():
  images = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  tokens = layers.patchify(images, 2)
  assert tokens.shape == (2, 4, 12)
  # Token 1 is the patch at row 0, column 1: pixels (0..1, 2..3), features in (dy, dx, c).
  np.testing.assert_array_equal(tokens[0, 1], images[0, 0:2, 2:4].reshape(-1))
  np.testing.assert_array_equal(layers.unpatchify(tokens, 2, 4, 4), images)


def test_sincos_positions_are_distinct_and_bounded():
  pos = layers.sincos_2d_positions(32, 4)
  assert pos.shape == (16, 32)
  assert np.abs(pos).max() <= 1.0
  distances = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
  assert (distances + np.eye(16) > 1e-3).all()


def test_text_encoder_rejects_too_long_text():
  config = tiny_model_config()
  encoder = TextEncoder(config, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="text_max_len"):
    encoder(jnp.ones((1, config.text_max_len + 1), jnp.int32))


def test_every_parameter_carries_logical_axis_names():
  from ecdit_jax.parallel import axes
  config = tiny_model_config(moe_layout="every")
  model = TextToImageDiT(config, rngs=nnx.Rngs(0))
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  params = nnx.state(model, nnx.Param)
  names = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  arrays = jax.tree.leaves(params)
  assert len(names) == len(arrays) > 0
  for spec, array in zip(names, arrays):
    assert len(spec) == array.ndim, (spec, array.shape)
    assert all(n is None or n in axes.ALL_LOGICAL_AXES for n in spec), spec
  # All expert weights are split along the expert axis first.
  expert_specs = jax.tree.leaves(
      nnx.get_partition_spec(nnx.state(model.dit.blocks[0].ffn.experts, nnx.Param)),
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(expert_specs) == 4 and all(s[0] == axes.EXPERT for s in expert_specs)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["block", "dots", "matmuls"])
def test_remat_recomputes_blocks_and_keeps_the_gradients(remat):
  plain = TextToImageDiT(tiny_model_config(), rngs=nnx.Rngs(0))
  perturb_all_params(plain)
  graphdef, params = nnx.split(plain, nnx.Param)
  remat_graphdef, _ = nnx.split(TextToImageDiT(tiny_model_config(remat=remat), rngs=nnx.Rngs(0)),
                                nnx.Param)
  x, t, tokens = inputs(tiny_model_config())

  def loss(graphdef):
    return lambda p: jnp.mean(nnx.merge(graphdef, p)(x, t, tokens)[0] ** 2)

  want = jax.grad(loss(graphdef))(params)
  got = jax.grad(loss(remat_graphdef))(params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  program = str(jax.make_jaxpr(jax.grad(loss(remat_graphdef)))(params))
  assert program.count("remat") + program.count("checkpoint") >= 2  # one per block



@pytest.mark.slow
def test_each_remat_policy_keeps_more_than_the_last():
  """block keeps the blocks' inputs; dots also the dense layers' matmul outputs; matmuls also
  the batched ones (experts, attention scores); none everything."""
  x, t, tokens = inputs(tiny_model_config())
  kept = {}
  for remat in ("block", "dots", "matmuls", "none"):
    graphdef, params = nnx.split(TextToImageDiT(tiny_model_config(remat=remat),
                                                rngs=nnx.Rngs(0)), nnx.Param)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(x, t, tokens)[0] ** 2)
    _, backward = jax.vjp(loss, params)  # a pytree whose leaves are what it saved
    kept[remat] = sum(leaf.size for leaf in jax.tree.leaves(backward))
  assert kept["block"] < kept["dots"] < kept["matmuls"] < kept["none"], kept


def test_bad_remat_policy_names_the_key():
  from ecdit_jax.model import ConfigError
  with pytest.raises(ConfigError, match=r"config\.model\.remat"):
    tiny_model_config(remat="everything")

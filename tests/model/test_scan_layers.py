"""Scan over layers (config.model.scan_layers): the same weights, outputs and gradients as the
unrolled model, one block body in the program whatever the depth, and a clear config error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ecdit_jax.model import ConfigError, TextToImageDiT
from ecdit_jax.model.layer_stacking import (cast_for_compute, params_for_compute,
                                            stack_block_params, unstack_block_params)
from ecdit_jax.parallel import axes
from ecdit_jax.parallel import mesh as mesh_lib
from ecdit_jax.model.params import to_pure_dict

from tests.tiny import perturbed, tiny_model_config

LAYOUTS = ["every_other", "every", "none"]


def _params(model):
  return to_pure_dict(nnx.state(model, nnx.Param))


def _stacked(params, period):
  return {**params, "dit": stack_block_params(params["dit"], period)}


def _unstacked(params):
  return {**params, "dit": unstack_block_params(params["dit"])}


def _inputs(config, batch=2):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (batch, config.image_size, config.image_size, config.in_channels))
  t = jax.random.uniform(k2, (batch,))
  tokens = jax.random.randint(k3, (batch, config.text_max_len), 2, config.text_vocab_size)
  return x, t, tokens


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_seed_gives_the_unrolled_weights_stacked(layout):
  unrolled = TextToImageDiT(tiny_model_config(num_layers=4, moe_layout=layout), rngs=nnx.Rngs(0))
  config = tiny_model_config(num_layers=4, moe_layout=layout, scan_layers=True)
  scanned = TextToImageDiT(config, rngs=nnx.Rngs(0))
  want, got = _stacked(_params(unrolled), config.layer_period), _params(scanned)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert all(leaf.shape[0] == 4 // config.layer_period
             for leaf in jax.tree.leaves(got["dit"]["stacked_blocks"]))
  # The conversion back restores the unrolled dict exactly.
  back = _unstacked(got)
  assert jax.tree.structure(back) == jax.tree.structure(_params(unrolled))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(_params(unrolled))):
    np.testing.assert_array_equal(a, b)
  # Block keys as strings (as a restored checkpoint may give them) convert alike, in order.
  as_strings = {**_params(unrolled)["dit"]}
  as_strings["blocks"] = {str(i): v for i, v in as_strings["blocks"].items()}
  for a, b in zip(jax.tree.leaves(stack_block_params(as_strings, config.layer_period)),
                  jax.tree.leaves(want["dit"])):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="already stacked"):
    stack_block_params(got["dit"], config.layer_period)


@pytest.mark.slow
@pytest.mark.parametrize("layout,remat,router,dtype,dispatch,train", [
    ("every_other", "none", "expert_choice", "float32", "gather", True),
    ("every_other", "dots", "expert_choice", "float32", "gather", True),
    ("every", "block", "token_choice", "float32", "gather", True),
    ("every_other", "dots", "expert_choice", "float32", "hybrid", False),
    ("every_other", "block", "expert_choice", "bfloat16", "gather", True)])
def test_scanned_outputs_and_gradients_equal_the_unrolled_ones(layout, remat, router, dtype,
                                                               dispatch, train):
  overrides = dict(num_layers=4, moe_layout=layout, remat=remat, router=router, dtype=dtype,
                   moe_dispatch=dispatch, eval_capacity_factor=1.0)
  unrolled_config = tiny_model_config(**overrides)
  scanned_config = tiny_model_config(scan_layers=True, **overrides)
  # bfloat16: the scan casts the stacked weights once, before the loop; the values are the
  # ones the unrolled blocks cast at use, so only XLA's different fusion of the bf16
  # arithmetic separates the two.
  def close(got, want, rtol=1e-5):
    if dtype == "float32":
      np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6)
    else:  # to within bf16 rounding, as a whole: single tiny entries are all rounding noise
      got, want = np.ravel(np.asarray(got, np.float32)), np.ravel(np.asarray(want, np.float32))
      assert np.linalg.norm(got - want) <= 2e-2 * np.linalg.norm(want) + 1e-6

  graphdef, _ = nnx.split(TextToImageDiT(unrolled_config, rngs=nnx.Rngs(0)), nnx.Param)
  scanned_graphdef, _ = nnx.split(TextToImageDiT(scanned_config, rngs=nnx.Rngs(0)), nnx.Param)
  params = perturbed(_params(TextToImageDiT(unrolled_config, rngs=nnx.Rngs(0))))
  period = scanned_config.layer_period
  x, t, tokens = _inputs(unrolled_config)
  keep = jnp.array([[0, 3, 5, 9, 12, 15], [1, 2, 4, 8, 13, 14]])  # token masking, too

  def forward(graphdef):
    return lambda p: nnx.merge(graphdef, p)(x, t, tokens, keep_index=keep, train=train)

  def loss(graphdef):
    def fn(p):
      out, aux = forward(graphdef)(p)
      return jnp.mean(out ** 2) + aux["aux_loss"]
    return fn

  out, aux = jax.jit(forward(graphdef))(params)
  scanned_out, scanned_aux = jax.jit(forward(scanned_graphdef))(_stacked(params, period))
  close(scanned_out, out)
  assert jax.tree.structure(scanned_aux) == jax.tree.structure(aux)
  for a, b in zip(jax.tree.leaves(scanned_aux), jax.tree.leaves(aux)):
    close(a, b)  # per-layer stats in layer order
  if layout != "none":
    assert aux["token_counts"].shape[0] == len(unrolled_config.moe_layer_indices)
  grads = jax.jit(jax.grad(loss(graphdef)))(params)
  scanned_grads = jax.jit(jax.grad(loss(scanned_graphdef)))(_stacked(params, period))
  scanned_grads = _unstacked(scanned_grads)
  assert jax.tree.structure(scanned_grads) == jax.tree.structure(grads)
  if dtype == "float32":
    for a, b in zip(jax.tree.leaves(scanned_grads), jax.tree.leaves(grads)):
      close(a, b, rtol=1e-4)
  else:
    close(_flat(scanned_grads), _flat(grads))


def test_the_cast_before_the_scan_keeps_the_router_and_norms_in_float32():
  config = tiny_model_config(num_layers=4, scan_layers=True, dtype="bfloat16")
  block = TextToImageDiT(config, rngs=nnx.Rngs(0)).dit.stacked_blocks[1]
  cast = to_pure_dict(cast_for_compute(nnx.state(block, nnx.Param), jnp.bfloat16))
  flat = {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(cast)[0]}
  assert flat["['ffn']['router']['kernel']"].dtype == jnp.float32  # f32 router logits
  assert flat["['self_attn']['query_norm']['scale']"].dtype == jnp.float32
  for name in ("['ffn']['experts']['w_in']", "['self_attn']['query']['kernel']",
               "['modulation']['proj']['kernel']", "['cross_attn']['out']['kernel']"):
    assert flat[name].dtype == jnp.bfloat16, name
  original = to_pure_dict(nnx.state(block, nnx.Param))["ffn"]["experts"]["w_in"]
  np.testing.assert_array_equal(cast["ffn"]["experts"]["w_in"], original.astype(jnp.bfloat16))


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(tree)])


def _equation_count(config):
  model = TextToImageDiT(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  x, t, tokens = _inputs(config)
  jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(x, t, tokens)[0])(params)
  return len(jaxpr.jaxpr.eqns)


def test_the_program_does_not_grow_with_depth():
  # Unrolled, each block adds its equations; scanned, depth only changes the scan's length.
  unrolled = [_equation_count(tiny_model_config(num_layers=n)) for n in (2, 6)]
  scanned = [_equation_count(tiny_model_config(num_layers=n, scan_layers=True)) for n in (2, 6)]
  assert unrolled[1] > unrolled[0] + 50
  assert scanned[1] == scanned[0]


def test_stacked_parameters_keep_the_layers_axis_whole():
  config = tiny_model_config(num_layers=4, scan_layers=True)
  model = TextToImageDiT(config, rngs=nnx.Rngs(0))
  specs = to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  blocks = jax.tree.leaves(specs["dit"]["stacked_blocks"],
                           is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  assert blocks and all(spec[0] == axes.LAYERS for spec in blocks)
  assert all(axes.LAYERS not in spec for spec in jax.tree.leaves(
      specs["dit"]["final"], is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)))
  assert dict(mesh_lib.RULES)[axes.LAYERS] is None
  w_in = specs["dit"]["stacked_blocks"][1]["ffn"]["experts"]["w_in"]
  assert tuple(w_in) == (axes.LAYERS, axes.EXPERT, axes.EMBED, axes.MLP)


def test_a_depth_the_pattern_does_not_divide_names_the_keys():
  with pytest.raises(ConfigError, match=r"config\.model\.scan_layers.*config\.model\.num_layers"):
    tiny_model_config(num_layers=3, scan_layers=True)
  tiny_model_config(num_layers=3, scan_layers=True, moe_layout="every")  # a pattern of one block
  with pytest.raises(ConfigError, match=r"config\.model\.scan_layers"):
    tiny_model_config(scan_layers="yes")


def test_the_whole_tree_cast_agrees_in_both_layouts_and_with_the_stacked_blocks_cast():
  """params_for_compute (the step's and the sampler's cast, once per call) casts the same weights
  in either layout, and, stacked, those that scan_blocks casts before its scan."""
  config = tiny_model_config(num_layers=4, scan_layers=True, dtype="bfloat16")
  model = TextToImageDiT(config, rngs=nnx.Rngs(0))
  stacked = _params(model)
  cast = params_for_compute(stacked, jnp.bfloat16)
  unrolled_cast = params_for_compute(_unstacked(stacked), jnp.bfloat16)
  dtypes = lambda tree: jax.tree.map(lambda x: x.dtype, tree)
  assert dtypes(_stacked(unrolled_cast, config.layer_period)) == dtypes(cast)
  for j, block in enumerate(model.dit.stacked_blocks):
    by_scan = to_pure_dict(cast_for_compute(nnx.state(block, nnx.Param), jnp.bfloat16))
    assert dtypes(by_scan) == dtypes(cast["dit"]["stacked_blocks"][j])
  assert cast["dit"]["stacked_blocks"][1]["ffn"]["router"]["kernel"].dtype == jnp.float32
  assert cast["text_encoder"]["token_embed"]["embedding"].dtype == jnp.bfloat16
  assert cast["text_encoder"]["final_norm"]["scale"].dtype == jnp.float32
  for x, c in zip(jax.tree.leaves(stacked), jax.tree.leaves(cast)):
    np.testing.assert_array_equal(np.asarray(c), np.asarray(x.astype(c.dtype)))

"""Mesh sizes, logical-axis rules, and sharded == unsharded for the model's forward pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ecdit_jax.errors import ConfigError
from ecdit_jax.model import ModelConfig, TextToImageDiT
from ecdit_jax.model.attention import Attention
from ecdit_jax.parallel import mesh as mesh_lib
from ecdit_jax.parallel.mesh import MeshConfig
from tests.tiny import perturbed


def test_mesh_shape_fills_one_axis_and_names_bad_keys():
  assert MeshConfig(data=-1, expert=4).shape(8) == dict(data=2, fsdp=1, expert=4, tensor=1)
  with pytest.raises(ConfigError, match=r"config\.mesh\.fsdp=-1"):
    MeshConfig(data=1, fsdp=-1, expert=3).shape(8)
  with pytest.raises(ConfigError, match="use 4 devices"):
    MeshConfig(data=4).shape(8)
  with pytest.raises(ConfigError, match="only one"):
    MeshConfig(data=-1, fsdp=-1)
  with pytest.raises(ConfigError, match=r"config\.mesh\.tensor=0"):
    MeshConfig(tensor=0)
  assert MeshConfig.parse("expert=2,fsdp=2") == MeshConfig(data=-1, fsdp=2, expert=2)
  assert MeshConfig.parse("") is None
  with pytest.raises(ConfigError, match="--mesh='pipeline=2'"):
    MeshConfig.parse("pipeline=2")


def test_rules_map_logical_names_to_mesh_axes():
  mesh = mesh_lib.create_mesh(MeshConfig(expert=2, fsdp=2, tensor=2))
  assert mesh_lib.logical_to_mesh(("expert", "embed", "mlp"), (4, 8, 16), mesh) == P(
      "expert", "fsdp", "tensor")
  # A dimension that does not divide stays whole; so does a second use of one mesh axis.
  assert mesh_lib.logical_to_mesh(("expert", "embed"), (3, 8), mesh) == P(None, "fsdp")
  assert mesh_lib.logical_to_mesh(("embed", "text_embed"), (8, 8), mesh) == P("fsdp", None)
  assert mesh_lib.batch_sharding(mesh, 4).spec == P(("fsdp", "expert"), None, None, None)


@pytest.mark.parametrize("sizes", [{"data": 2, "fsdp": 2, "tensor": 2},
                                   {"fsdp": 4, "expert": 2}, {"data": 8}])
def test_sharded_forward_equals_unsharded(sizes):
  config = ModelConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, num_experts=4, text_vocab_size=64, text_max_len=8,
                       text_hidden_size=16, text_num_layers=1, text_num_heads=2,
                       dtype="float32")
  model = TextToImageDiT(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = perturbed(params)
  mesh = mesh_lib.create_mesh(MeshConfig(**sizes))
  # The model on the mesh: expert-parallel MoE layers where the mesh has an expert axis.
  mesh_graphdef = nnx.graphdef(TextToImageDiT(config, rngs=nnx.Rngs(0), mesh=mesh))
  k1, k2 = jax.random.split(jax.random.key(2))
  x = jax.random.normal(k1, (8, 16, 16, 3))
  t = jax.random.uniform(k2, (8,))
  tokens = jnp.tile(jnp.array([[5, 6, 7, 1, 0, 0, 0, 0]]), (8, 1))

  def forward(graphdef, params, x, t, tokens):
    return nnx.merge(graphdef, params)(x, t, tokens)[0]

  expected = jax.jit(functools.partial(forward, graphdef))(params, x, t, tokens)
  shardings = mesh_lib.tree_shardings(params, nnx.get_partition_spec(nnx.state(model, nnx.Param)),
                                      mesh)
  sharded_params = jax.device_put(params, shardings)
  data = mesh_lib.batch_sharding(mesh, 4)
  inputs = [jax.device_put(a, mesh_lib.batch_sharding(mesh, a.ndim)) for a in (x, t, tokens)]
  got = jax.jit(functools.partial(forward, mesh_graphdef), out_shardings=data)(sharded_params,
                                                                                *inputs)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  if sizes.get("fsdp", 1) > 1:  # parameters really are split across devices
    w_in = sharded_params["dit"]["blocks"][1]["ffn"]["experts"]["w_in"]
    w_in = jax.tree.leaves(w_in)[0]
    assert w_in.addressable_shards[0].data.size < w_in.size


def test_constrain_pins_activations_under_a_mesh_and_is_a_no_op_outside():
  x = jnp.arange(8 * 5 * 4 * 6, dtype=jnp.float32).reshape(8, 5, 4, 6)
  names = (mesh_lib.BATCH, None, "heads", "kv")
  assert mesh_lib.constrain(x, names, None) is x  # no mesh: nothing to pin to
  mesh = mesh_lib.create_mesh(MeshConfig(fsdp=4, tensor=2))
  out = jax.jit(lambda a: mesh_lib.constrain(a * 2, names, mesh))(x)
  assert out.sharding.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, P("fsdp", None, "tensor", None)), x.ndim)
  np.testing.assert_array_equal(out, 2 * x)


def test_attention_under_a_mesh_with_split_parameters_equals_unsharded():
  mesh = mesh_lib.create_mesh(MeshConfig(fsdp=4, tensor=2))
  make = lambda mesh: Attention(32, 4, 2, rngs=nnx.Rngs(0), dtype=jnp.float32,
                                param_dtype=jnp.float32, qk_norm=True, context_size=16, mesh=mesh)
  layer = make(None)
  graphdef, params = nnx.split(layer, nnx.Param)
  mesh_graphdef = nnx.graphdef(make(mesh))
  params = perturbed(params)
  x = jax.random.normal(jax.random.key(1), (8, 6, 32))
  context = jax.random.normal(jax.random.key(2), (8, 3, 16))
  lengths = jnp.array([3, 2, 1, 3, 3, 2, 1, 3])

  def forward(graphdef, params, x, context, lengths):
    return nnx.merge(graphdef, params)(x, context, lengths)

  expected = jax.jit(functools.partial(forward, graphdef))(params, x, context, lengths)
  specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
  sharded = jax.device_put(params, mesh_lib.tree_shardings(params, specs, mesh))
  inputs = [jax.device_put(a, mesh_lib.batch_sharding(mesh, a.ndim)) for a in (x, context, lengths)]
  got = jax.jit(functools.partial(forward, mesh_graphdef))(sharded, *inputs)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

"""Data, FSDP and expert parallelism give the single-device numbers: the forward output, the
gradients and three training steps, on meshes of 8 simulated CPU devices."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ecdit_jax import config as config_lib
from ecdit_jax.errors import ConfigError
from ecdit_jax.model.layer_stacking import stack_block_params, unstack_block_params
from ecdit_jax.parallel import mesh as mesh_lib
from ecdit_jax.train import sharding
from ecdit_jax.train.optimizer import make_optimizer
from ecdit_jax.train.state import create_train_state
from ecdit_jax.train.step import make_loss_fn, make_train_step
from tests.tiny import perturbed, tiny_train_config

pytestmark = pytest.mark.slow  # trains, or runs the tools: CI runs it, the fast lane skips it

# expert x tensor: the experts' hidden width split over `tensor` inside shard_map, their partial
# outputs summed with psum.
MESHES = [{"data": 8}, {"fsdp": 8}, {"data": 2, "expert": 4}, {"fsdp": 2, "expert": 4},
          {"data": 2, "fsdp": 2, "expert": 2}, {"data": 2, "expert": 2, "tensor": 2}]


def _config(**overrides) -> config_lib.TrainConfig:
  config = tiny_train_config("", **{"model.image_size": 16, "model.routing_group_size": 2,
                                    **overrides})
  return config_lib.TrainConfig.from_mapping(config)


def _mesh(sizes):
  return mesh_lib.create_mesh(mesh_lib.MeshConfig(**sizes))


def _batches(model_config, count, size=8):
  rng = np.random.default_rng(0)
  return [{"image": rng.uniform(-1, 1, (size, 16, 16, 3)).astype(np.float32),
           "tokens": rng.integers(3, 40, (size, model_config.text_max_len)).astype(np.int32)}
          for _ in range(count)]


def _null(model_config):
  null = np.zeros(model_config.text_max_len, np.int32)
  null[0] = 1
  return null


def _run(config, mesh, batches, prepare=perturbed, rules=mesh_lib.RULES):
  """Gradients at the first batch and the losses/params of three steps, on ``mesh`` (parameters
  laid out by ``rules``) or on one device when ``mesh`` is None; ``prepare`` turns the initial
  parameters into the ones used."""
  optimizer = make_optimizer(config)
  null = _null(config.model)
  if mesh is None:
    graphdef, state = create_train_state(config.model, optimizer, config.seed)
    shardings = None
  else:
    graphdef, state, shardings = sharding.init_train_state(config.model, optimizer, config.seed,
                                                           mesh, rules=rules)
  state = state.replace(params=prepare(state.params))
  loss_fn = make_loss_fn(graphdef, config, null, masked=True)
  grad_fn = jax.jit(jax.grad(loss_fn, has_aux=True))
  step_fn = make_train_step(graphdef, config, optimizer, null, masked=True)
  if mesh is None:
    step = jax.jit(step_fn)
    grads, (_, aux) = grad_fn(state.params, batches[0], jax.random.key(7))
    losses = []
    for batch in batches:
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    return grads, aux, losses, state
  step = sharding.jit_train_step(step_fn, shardings, mesh)
  state = jax.device_put(state, shardings)
  first = sharding.global_batch(batches[0], mesh)
  grads, (_, aux) = grad_fn(state.params, first, jax.random.key(7))
  program = str(jax.make_jaxpr(loss_fn)(state.params, first, jax.random.key(7)))
  # Experts really run distributed: tokens travel to their experts' devices and back; with the
  # hidden width split over `tensor`, the partial outputs are summed across it.
  assert (program.count("all_to_all") == 2) == (mesh.shape["expert"] > 1)
  assert ("psum" in program) == (mesh.shape["expert"] > 1 and mesh.shape["tensor"] > 1)
  losses = []
  for batch in batches:
    state, metrics = step(state, sharding.global_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  return grads, aux, losses, state


@pytest.fixture(scope="module")
def reference():
  config = _config(**{"diffusion.mask_ratio": 0.5, "grad_accum_steps": 2})
  batches = _batches(config.model, 3)
  return config, batches, _run(config, None, batches)


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: "x".join(f"{k}{v}" for k, v in s.items()))
def test_sharded_training_equals_single_device(sizes, reference):
  config, batches, (grads0, aux0, losses0, state0) = reference
  mesh = _mesh(sizes)
  grads, aux, losses, state = _run(config, mesh, batches)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
  # Routing decisions are identical: the same number of experts took every token.
  np.testing.assert_array_equal(aux["moe"]["experts_per_token"], aux0["moe"]["experts_per_token"])
  np.testing.assert_allclose(losses, losses0, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(state0.params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The layout is the one asked for: experts split over `expert`, FSDP splits the width.
  w_in = state.params["dit"]["blocks"][1]["ffn"]["experts"]["w_in"]
  spec = w_in.sharding.spec
  assert (spec[0] == "expert") == (sizes.get("expert", 1) > 1)
  assert (spec[1] == "fsdp") == (sizes.get("fsdp", 1) > 1)
  nu = jax.tree.leaves(state.opt_state)  # optimizer moments follow their parameters
  assert any(leaf.shape == w_in.shape and leaf.sharding.spec == spec for leaf in nu)


def test_dense_weights_split_over_the_expert_axis_train_the_same(reference):
  """config.mesh.dense_over_expert: the expert axis splits the dense weights' model dimension
  after fsdp (ZeRO-3 over it too); the experts keep their layout; same numbers."""
  config, batches, (grads0, _, losses0, state0) = reference
  mesh_config = mesh_lib.MeshConfig(data=1, fsdp=2, expert=4, dense_over_expert=True)
  mesh = mesh_lib.create_mesh(mesh_config)
  grads, _, losses, state = _run(config, mesh, batches, rules=mesh_config.param_rules())
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(losses, losses0, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(state0.params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  blocks = state.params["dit"]["blocks"]
  assert tuple(blocks[1]["ffn"]["experts"]["w_in"].sharding.spec)[:2] == ("expert", "fsdp")
  dense_block = blocks[0]
  for dense in (dense_block["self_attn"]["query"]["kernel"],
                dense_block["modulation"]["proj"]["kernel"], dense_block["ffn"]["fc1"]["kernel"]):
    assert tuple(dense.sharding.spec)[0] == ("fsdp", "expert")
  for ema, param in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params)):
    assert ema.sharding.spec == param.sharding.spec


def test_scan_over_layers_trains_as_the_unrolled_model_on_a_mesh(reference):
  """Stacked blocks on an FSDP x expert mesh: the unrolled single-device gradients, losses and
  parameters once converted back, with the stacked weights split as their unrolled ones."""
  config, batches, _ = reference
  with_model = lambda **changes: config.replace(model=dataclasses.replace(config.model, **changes))
  config = with_model(num_layers=4)  # two repeats of the dense/MoE pair
  grads0, aux0, losses0, state0 = _run(config, None, batches)
  config = with_model(num_layers=4, scan_layers=True)
  unstack = lambda p: {**p, "dit": unstack_block_params(p["dit"])}
  stack = lambda p: {**p, "dit": stack_block_params(p["dit"], 2)}
  mesh = _mesh({"fsdp": 2, "expert": 4})
  grads, aux, losses, state = _run(config, mesh, batches,
                                   prepare=lambda p: stack(perturbed(unstack(p))))
  for got, want in zip(jax.tree.leaves(unstack(grads)), jax.tree.leaves(grads0)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
  np.testing.assert_array_equal(aux["moe"]["experts_per_token"], aux0["moe"]["experts_per_token"])
  np.testing.assert_allclose(losses, losses0, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(unstack(state.params)), jax.tree.leaves(state0.params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  w_in = state.params["dit"]["stacked_blocks"][1]["ffn"]["experts"]["w_in"]
  assert w_in.ndim == 4 and tuple(w_in.sharding.spec)[:3] == (None, "expert", "fsdp")


@pytest.mark.parametrize("method", ["gather", "einsum", "hybrid"])
def test_expert_parallel_layer_pads_groups_that_do_not_divide(method):
  """6 images in groups of 2 = 3 groups over 4 batch shards: dummy groups are added and
  dropped, and the result and its gradients are still the single-device ones, with each
  dispatch method."""
  config = _config(**{"model.moe_dispatch": method})
  mesh = _mesh({"data": 2, "expert": 4})
  graphdef, state = create_train_state(config.model, make_optimizer(config), 0)
  ep_graphdef, _ = create_train_state(config.model, make_optimizer(config), 0, mesh)
  params = perturbed(state.params)
  x = jax.random.normal(jax.random.key(3), (6, 16, 16, 3))
  t = jax.random.uniform(jax.random.key(4), (6,))
  tokens = jnp.tile(jnp.array([[5, 6, 7, 1] + [0] * 8]), (6, 1))

  def forward(graphdef, params):
    return nnx.merge(graphdef, params)(x, t, tokens, train=False)[0]

  cotangent = jax.random.normal(jax.random.key(5), x.shape)
  # Gradients too: the dispatch methods differ most in their backward passes.
  loss = lambda graphdef: lambda p: jnp.sum(forward(graphdef, p) * cotangent)
  expected = jax.jit(lambda p: forward(graphdef, p))(params)
  expected_grads = jax.jit(jax.grad(loss(graphdef)))(params)
  assert "all_to_all" in str(jax.make_jaxpr(jax.grad(loss(ep_graphdef)))(params))
  got = jax.jit(lambda p: forward(ep_graphdef, p))(params)
  grads = jax.jit(jax.grad(loss(ep_graphdef)))(params)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  w_in = lambda g: g["dit"]["blocks"][1]["ffn"]["experts"]["w_in"]
  assert float(jnp.abs(w_in(expected_grads)).max()) > 0
  # Gradients reach 30 in size: float32 sums of such terms differ by order 1e-6 with the order
  # of summation, so near-zero entries are compared to an absolute 1e-5.
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)


def test_config_errors_name_the_mesh_key():
  with pytest.raises(ConfigError, match=r"config\.mesh\.expert=8"):
    config_lib.check_devices(_config(**{"mesh.data": 1, "mesh.expert": 8}), 8, 1)  # 4 experts
  with pytest.raises(ConfigError, match="batch shards"):
    config_lib.check_devices(_config(batch_size=12), 8, 1)  # 8 data shards
  with pytest.raises(ConfigError, match=r"config\.mesh"):
    config_lib.check_devices(_config(**{"mesh.data": 3}), 8, 1)


def _whole_split_weights_in_loops(config, mesh) -> list[str]:
  """The shapes of parameters split over ``mesh`` that some loop of the compiled train step
  carries whole (every while loop's state, per device after partitioning)."""
  optimizer = make_optimizer(config)
  graphdef, state, shardings = sharding.init_train_state(config.model, optimizer, config.seed,
                                                         mesh)
  step = sharding.jit_train_step(
      make_train_step(graphdef, config, optimizer, _null(config.model), masked=True),
      shardings, mesh)
  batch = sharding.global_batch(_batches(config.model, 1)[0], mesh)
  hlo = step.lower(state, batch).compile().as_text()
  text = lambda shape: "f32[" + ",".join(map(str, shape)) + "]"
  leaves = jax.tree.leaves(state.params)
  per_device = {text(x.sharding.shard_shape(x.shape)) for x in leaves}
  whole = {text(x.shape) for x in leaves if x.ndim >= 2} - per_device
  carries = re.findall(r"= \((.*?)\) while\(", hlo)
  assert carries, "no loop in the compiled step"
  return sorted(shape for shape in whole if any(shape + "{" in c for c in carries))


def test_weights_gathered_in_every_micro_batch_train_the_same(reference):
  """config.gather_weights_per_micro_batch: on an fsdp mesh no loop of the step holds a split
  weight whole (left to itself, XLA hoists the all-gathers out of the accumulation loop and
  carries the whole weights through it), and training gives the single-device numbers."""
  config, batches, (_, _, losses0, state0) = reference
  config = config.replace(gather_weights_per_micro_batch=True)
  mesh = _mesh({"fsdp": 8})
  assert _whole_split_weights_in_loops(config, mesh) == []
  _, _, losses, state = _run(config, mesh, batches)
  np.testing.assert_allclose(losses, losses0, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(state0.params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

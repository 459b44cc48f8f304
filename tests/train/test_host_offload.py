"""config.host_offload: the EMA and the optimizer's moments kept in host memory between steps
train exactly as when they stay on the devices, on a mesh, and save and restore either way; the
step lowered for GPUs and TPUs brings them to device memory only after the gradient pass."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ecdit_jax import config as config_lib
from ecdit_jax.checkpoint import Checkpointer
from ecdit_jax.inference.sampler import make_sampler
from ecdit_jax.parallel import mesh as mesh_lib
from ecdit_jax.train import sharding
from ecdit_jax.train.optimizer import make_optimizer
from ecdit_jax.train.state import abstract_train_state
from ecdit_jax.train.step import make_train_step
from tests.tiny import tiny_train_config


def _config(host_offload):
  return config_lib.TrainConfig.from_mapping(tiny_train_config(
      "", host_offload=host_offload, grad_accum_steps=2, batch_size=8,
      **{"model.image_size": 16, "mesh.fsdp": 2, "mesh.data": -1}))


def _train(host_offload, steps=3, per_call=1):
  """``steps`` steps, ``per_call`` a jitted call (a scan over stacked batches when > 1)."""
  config = _config(host_offload)
  mesh = mesh_lib.create_mesh(config.mesh, jax.devices()[:4])
  optimizer = make_optimizer(config)
  graphdef, state, shardings = sharding.init_train_state(
      config.model, optimizer, config.seed, mesh, config.host_offloaded)
  null = np.zeros(config.model.text_max_len, np.int32)
  null[0] = 1
  step = sharding.jit_train_step(make_train_step(graphdef, config, optimizer, null, masked=True),
                                 shardings, mesh, stacked=per_call > 1)
  rng = np.random.default_rng(0)
  batches = [sharding.global_batch(
      {"image": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
       "tokens": rng.integers(3, 40, (8, config.model.text_max_len)).astype(np.int32)}, mesh)
      for _ in range(steps)]
  for start in range(0, steps, per_call):
    group = batches[start:start + per_call]
    state, metrics = step(state, sharding.make_batch_stacker(mesh)(group) if per_call > 1
                          else group[0])
  assert not np.any(metrics["nonfinite"])
  return config, mesh, optimizer, state


def _memory_kinds(tree):
  return {leaf.sharding.memory_kind for leaf in jax.tree.leaves(tree)}


@pytest.mark.slow  # trains: CI runs it, the fast lane skips it
def test_offloaded_state_trains_exactly_as_on_the_devices(tmp_path):
  _, _, _, want = _train("")
  config, mesh, optimizer, got = _train("ema,optimizer")
  assert _memory_kinds(want.ema_params) == _memory_kinds(want.opt_state) == {"device"}
  assert _memory_kinds(got.ema_params) == _memory_kinds(got.opt_state) == {"pinned_host"}
  assert _memory_kinds(got.params) == {"device"}
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

  # Saved from host memory; restored into host memory, or onto the devices by a run that no
  # longer offloads.
  checkpointer = Checkpointer(str(tmp_path), async_save=False)
  checkpointer.save(3, got, config.to_dict(), {})
  _, abstract = abstract_train_state(config.model, optimizer, config.seed, mesh)
  for offload, kind in ((("ema", "optimizer"), "pinned_host"), ((), "device")):
    shardings = sharding.state_shardings(abstract, config.model, mesh, offload)
    restored = checkpointer.restore(3, mesh_lib.with_shardings(abstract, shardings))
    assert _memory_kinds(restored.opt_state) == _memory_kinds(restored.ema_params) == {kind}
    for r, w in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(r), np.asarray(w))
  checkpointer.close()


@pytest.mark.slow  # trains
def test_several_offloaded_steps_a_call_carry_the_state_in_host_memory():
  """A scan over steps carries the offloaded parts from step to step in host memory."""
  *_, want = _train("", steps=2)
  *_, got = _train("ema,optimizer", steps=2, per_call=2)
  assert _memory_kinds(got.ema_params) == _memory_kinds(got.opt_state) == {"pinned_host"}
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowered_for_accelerators_the_state_moves_in_and_waits_for_the_gradients(platform):
  """The CPU has one memory, so the transfers are checked where they matter: in the step lowered
  for GPUs and TPUs, every offloaded leaf enters and leaves in host memory, is moved to device
  memory straight from the step's argument (as XLA's host offloading expects), and is used only
  from the barrier that follows the gradient-accumulation loop."""
  config = _config("ema,optimizer")
  mesh = mesh_lib.create_mesh(config.mesh, jax.devices()[:4])
  optimizer = make_optimizer(config)
  graphdef, abstract = abstract_train_state(config.model, optimizer, config.seed, mesh)
  shardings = sharding.state_shardings(abstract, config.model, mesh, config.host_offloaded)
  null = np.zeros(config.model.text_max_len, np.int32)
  step = sharding.jit_train_step(make_train_step(graphdef, config, optimizer, null, masked=True),
                                 shardings, mesh)
  length = config.model.text_max_len
  batch = {"image": jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32,
                                         sharding=mesh_lib.batch_sharding(mesh, 4)),
           "tokens": jax.ShapeDtypeStruct((8, length), jnp.int32,
                                          sharding=mesh_lib.batch_sharding(mesh, 2))}
  text = jax.export.export(step, platforms=[platform])(
      mesh_lib.with_shardings(abstract, shardings), batch).mlir_module()
  main = text[text.index("func.func public @main"):]
  host_args = re.findall(r'(%arg\d+): tensor<[^>]*> \{mhlo.memory_kind = "pinned_host"', main)
  offloaded = len(jax.tree.leaves((abstract.ema_params, abstract.opt_state)))
  assert len(host_args) == offloaded
  assert main.count('mhlo.memory_kind = "pinned_host"') == 2 * offloaded  # arguments, results
  moved = dict(re.findall(r"(%\d+) = stablehlo.custom_call @annotate_device_placement\("
                          r'(%arg\d+)\)[^\n]*_xla_buffer_placement = "device"', main))
  assert sorted(moved.values()) == sorted(host_args)
  barrier = re.search(r"%\S+ = stablehlo.optimization_barrier ([^\n]*)", main)
  assert barrier and "stablehlo.while" in main[:barrier.start()]  # after the accumulation
  assert set(moved) <= set(re.findall(r"%\d+", barrier[1]))

  # Without offloading the step has no transfers and no barrier.
  config = _config("")
  shardings = sharding.state_shardings(abstract, config.model, mesh)
  step = sharding.jit_train_step(make_train_step(graphdef, config, optimizer, null, masked=True),
                                 shardings, mesh)
  text = jax.export.export(step, platforms=[platform])(
      mesh_lib.with_shardings(abstract, shardings), batch).mlir_module()
  assert "pinned_host" not in text and "optimization_barrier" not in text


def test_a_sampler_given_the_offloaded_ema_moves_it_to_the_devices():
  """Training's sample grids and evaluations sample with the EMA as the state holds it: from
  host memory the sampler (lowered for GPUs here) brings every parameter to device memory."""
  config = _config("ema")
  mesh = mesh_lib.create_mesh(config.mesh, jax.devices()[:4])
  graphdef, abstract = abstract_train_state(config.model, make_optimizer(config), config.seed,
                                            mesh)
  shardings = sharding.state_shardings(abstract, config.model, mesh, config.host_offloaded)
  sampler = make_sampler(graphdef, config.model, num_steps=2, cfg_scale=3.0, method="euler",
                         param_shardings=shardings.ema_params, mesh=mesh)
  length = config.model.text_max_len
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=whole)
  args = (mesh_lib.with_shardings(abstract.ema_params, shardings.ema_params), None, None,
          spec((2, length), jnp.int32), spec((length,), jnp.int32), spec((), jnp.uint32),
          spec((2,), jnp.int32))
  main = jax.export.export(sampler.jitted, platforms=["cuda"])(*args).mlir_module()
  main = main[main.index("func.func public @main"):]
  host_args = re.findall(r'(%arg\d+): tensor<[^>]*> \{mhlo.memory_kind = "pinned_host"', main)
  assert len(host_args) == len(jax.tree.leaves(abstract.ema_params))
  moved = re.findall(r"annotate_device_placement\((%arg\d+)\)[^\n]*"
                     r'_xla_buffer_placement = "device"', main)
  assert sorted(moved) == sorted(host_args)

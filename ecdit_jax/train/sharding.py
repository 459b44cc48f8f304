"""Named shardings of the train state and the batch on a mesh, and process-local -> global arrays.

Parameters are sharded by their logical names through ``ecdit_jax.parallel.mesh.RULES``; the EMA
copy follows the parameters; every optimizer-state leaf that mirrors a parameter (RMSProp's
second moment, the momentum trace) takes that parameter's sharding, other leaves (counts) are
replicated. So FSDP shards parameters, EMA and optimizer state alike. Parts of the state named
in ``config.host_offload`` live in host memory (``HOST_MEMORY``) under the same layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ecdit_jax.data import batch as batch_keys
from ecdit_jax.model.config import ModelConfig
from ecdit_jax.model.params import param_shardings
from ecdit_jax.parallel import mesh as mesh_lib
from ecdit_jax.train.state import TrainState, abstract_train_state, create_train_state


HOST_MEMORY = "pinned_host"  # the memory kind of offloaded state: host memory the devices DMA


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _path_key(path) -> tuple:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(abstract_state: TrainState, model_config: ModelConfig, mesh: Mesh,
                    host_offload: tuple[str, ...] = (), rules=mesh_lib.RULES):
  """A TrainState of NamedShardings matching ``abstract_state``: parameters by ``rules``
  (``config.mesh.param_rules()``), the parts named in ``host_offload`` ("ema", "optimizer") in
  host memory."""
  params = param_shardings(model_config, mesh, rules)
  by_path = {_path_key(path): (sharding, leaf.shape) for (path, sharding), leaf in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(abstract_state.params))}
  longest = max(len(k) for k in by_path)

  def for_opt_leaf(path, leaf):
    key = _path_key(path)
    # An optimizer leaf mirroring a parameter ends with that parameter's path.
    for length in range(min(longest, len(key)), 0, -1):
      match = by_path.get(key[-length:])
      if match is not None and match[1] == leaf.shape:
        return match[0]
    return replicated(mesh)

  opt = jax.tree_util.tree_map_with_path(for_opt_leaf, abstract_state.opt_state)
  on_host = lambda tree: jax.tree.map(lambda s: s.with_memory_kind(HOST_MEMORY), tree)
  return TrainState(step=replicated(mesh), params=params,
                    ema_params=on_host(params) if "ema" in host_offload else params,
                    opt_state=on_host(opt) if "optimizer" in host_offload else opt,
                    rng=replicated(mesh))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays split over the batch axes (rows in process order)."""
  return {k: jax.make_array_from_process_local_data(mesh_lib.batch_sharding(mesh, v.ndim), v)
          for k, v in local_batch.items()}


def init_train_state(model_config: ModelConfig, optimizer, seed: int, mesh: Mesh,
                     host_offload: tuple[str, ...] = (), rules=mesh_lib.RULES):
  """(graphdef, state, state shardings): the state initialised under jit straight into its
  shards (``state_shardings``), so no device ever holds the whole model."""
  graphdef, abstract = abstract_train_state(model_config, optimizer, seed, mesh)
  shardings = state_shardings(abstract, model_config, mesh, host_offload, rules)
  init = jax.jit(lambda: create_train_state(model_config, optimizer, seed, mesh)[1],
                 out_shardings=shardings)
  return graphdef, init(), shardings


def stacked_batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Batches stacked along a leading steps axis (``ndim`` counts it): that axis whole, the
  batch axis split as in ``mesh_lib.batch_sharding``."""
  spec = mesh_lib.batch_sharding(mesh, ndim - 1).spec
  return NamedSharding(mesh, PartitionSpec(None, *spec))


def jit_train_step(train_step, shardings: TrainState, mesh: Mesh,
                   batch_ranks: dict[str, int] | None = None, *, stacked: bool = False):
  """The step jitted with the state's shardings in and out and the batch split over the batch
  axes.

  ``batch_ranks`` gives the batch's keys and their ranks (default: image and tokens). With
  ``stacked``, the function takes batches stacked along a leading axis (``make_batch_stacker``)
  and runs one step per batch in a ``lax.scan``, returning the metrics of every step stacked:
  the host dispatches once for several steps."""
  ranks = batch_keys.TOKEN_RANKS if batch_ranks is None else batch_ranks
  if stacked:
    batch = {key: stacked_batch_sharding(mesh, rank + 1) for key, rank in ranks.items()}
    fn = lambda state, batches: jax.lax.scan(train_step, state, batches)
  else:
    batch = {key: mesh_lib.batch_sharding(mesh, rank) for key, rank in ranks.items()}
    fn = train_step
  return jax.jit(fn, in_shardings=(shardings, batch),
                 out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def make_batch_stacker(mesh: Mesh, batch_ranks: dict[str, int] | None = None):
  """[global batch, ...] -> one batch with a leading steps axis, split like the batches (on the
  devices: encoded context stacks as well as host data)."""
  ranks = batch_keys.TOKEN_RANKS if batch_ranks is None else batch_ranks
  out = {key: stacked_batch_sharding(mesh, rank + 1) for key, rank in ranks.items()}
  return jax.jit(lambda batches: jax.tree.map(lambda *xs: jnp.stack(xs), *batches),
                 out_shardings=out)

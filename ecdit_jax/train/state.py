"""The train state: a plain pytree (nested dicts of arrays) that Orbax saves as it is."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ecdit_jax.model import params as params_lib
from ecdit_jax.model.config import ModelConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: training steps taken (batches consumed)
  params: Any  # nested dict of arrays (model.params.to_pure_dict)
  ema_params: Any
  opt_state: optax.OptState
  rng: jax.Array  # uint32 raw key data; advanced once per step


def create_train_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                       seed: int, mesh=None) -> tuple[nnx.GraphDef, TrainState]:
  """Initialises parameters, EMA, optimizer state and the step RNG from one seed; ``mesh``
  is the mesh the model will run on."""
  graphdef, params = params_lib.init_params(model_config, seed, mesh)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     ema_params=jax.tree.map(jnp.copy, params),
                     opt_state=optimizer.init(params),
                     rng=jax.random.key_data(jax.random.key(seed + 1)))
  return graphdef, state


def abstract_train_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                         seed: int, mesh=None) -> tuple[nnx.GraphDef, TrainState]:
  """Shapes and dtypes of the train state, without allocating it (for restoring)."""
  out = {}

  def init():
    graphdef, state = create_train_state(model_config, optimizer, seed, mesh)
    out["graphdef"] = graphdef
    return state

  state = jax.eval_shape(init)
  return out["graphdef"], state

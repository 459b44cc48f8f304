"""The model as (graphdef, parameters): built, abstract, and laid out on a mesh.

Parameters travel as plain nested dicts of arrays (what Orbax saves and optax updates); the
graphdef merges them back into a module inside jitted functions. Every parameter carries
logical axis names, which ``parallel.mesh`` turns into shardings.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from ecdit_jax.model.config import ModelConfig
from ecdit_jax.model.dit import TextToImageDiT
from ecdit_jax.model.keys import ParamKeys
from ecdit_jax.parallel import mesh as mesh_lib


def to_pure_dict(state: nnx.State) -> dict:
  """Nested dicts of arrays (or of whatever the state's leaves are)."""
  return nnx.to_pure_dict(state)


def build_model(config: ModelConfig, seed: int, mesh=None) -> TextToImageDiT:
  """The model with parameters drawn from ``seed``; ``mesh`` is the mesh it will run on.

  ParamKeys rather than nnx.Rngs: cheap to trace, so jitted and abstract builds stay fast."""
  return TextToImageDiT(config, rngs=ParamKeys(seed), mesh=mesh)


def init_params(config: ModelConfig, seed: int, mesh=None) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, parameters) of a freshly initialised model."""
  graphdef, params = nnx.split(build_model(config, seed, mesh))
  return graphdef, to_pure_dict(params)


def abstract_model(config: ModelConfig, mesh=None) -> TextToImageDiT:
  """The model with ShapeDtypeStructs in place of arrays: free to build at any size."""
  return nnx.eval_shape(lambda: build_model(config, 0, mesh))


def abstract_params(config: ModelConfig, mesh=None) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, the parameters' shapes and dtypes), nothing allocated."""
  graphdef, state = nnx.split(abstract_model(config, mesh))
  return graphdef, to_pure_dict(state)


def param_shardings(config: ModelConfig, mesh, rules=mesh_lib.RULES) -> Any:
  """NamedShardings of the parameter dict on ``mesh``, from the parameters' logical names by
  ``rules`` (``MeshConfig.param_rules()``)."""
  state = nnx.state(abstract_model(config, mesh), nnx.Param)
  return mesh_lib.tree_shardings(to_pure_dict(state), to_pure_dict(nnx.get_partition_spec(state)),
                                 mesh, rules)

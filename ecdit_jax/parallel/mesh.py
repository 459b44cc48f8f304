"""The device mesh and the logical-axis rules: the one place that maps model names to devices.

Mesh axes:
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  expert  expert parallelism: MoE weights split by expert (and the batch, outside MoE layers)
  tensor  tensor parallelism over heads and the FFN hidden width

Sizes come from ``config.mesh.{data,fsdp,expert,tensor}`` (within a slice); one of them may be -1
to take the remaining devices. Multi-slice TPU jobs add ``config.mesh.dcn_{data,fsdp,expert}``:
the number of slices along each axis, joined over the data-center network, so that only the
cheap collectives (data-parallel gradient reduction) cross slices. Parameters carry logical names (``ecdit_jax.parallel.axes``); ``RULES`` maps
each to a mesh axis. A dimension is left unsharded when its size does not divide evenly or when
its mesh axis is already used by another dimension of the same array.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ecdit_jax.parallel import axes

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH = "batch"  # logical name of the batch dimension of activations and inputs

RULES: tuple[tuple[str, Any], ...] = (
    (BATCH, ("data", "fsdp", "expert")),
    (axes.EMBED, "fsdp"),
    (axes.TEXT_EMBED, "fsdp"),
    (axes.MLP, "tensor"),
    (axes.HEADS, "tensor"),
    (axes.KV_HEADS, "tensor"),
    (axes.VOCAB, "tensor"),
    (axes.EXPERT, "expert"),
    (axes.HEAD_DIM, None),
    # Stacked layers stay whole on every device: the scan slices one layer per iteration.
    (axes.LAYERS, None),
)


class MeshConfigError(ValueError):
  """A mesh size that cannot work; the message names the key."""


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves ``config.mesh`` sizes (at most one -1) against the number of devices."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise MeshConfigError(f"unknown mesh axes {', '.join(f'config.mesh.{k}' for k in unknown)}; "
                          f"known: {MESH_AXES}")
  shape = {name: int(sizes.get(name, 1)) for name in MESH_AXES}
  fill = [name for name, size in shape.items() if size == -1]
  for name, size in shape.items():
    if size == 0 or size < -1:
      raise MeshConfigError(f"config.mesh.{name}={size} must be a positive size or -1")
  if len(fill) > 1:
    raise MeshConfigError(f"only one mesh axis may be -1, got {', '.join(fill)}")
  fixed = math.prod(size for size in shape.values() if size != -1)
  if fill:
    if num_devices % fixed:
      raise MeshConfigError(f"config.mesh.{fill[0]}=-1: {num_devices} devices are not divisible "
                            f"by the other axes' product {fixed}")
    shape[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise MeshConfigError(f"config.mesh sizes {shape} use {fixed} devices, but "
                          f"{num_devices} are available")
  return shape


DCN_PREFIX = "dcn_"


def split_dcn(sizes: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
  """``config.mesh`` -> (per-slice sizes, slice counts) keyed by mesh axis."""
  ici = {k: v for k, v in sizes.items() if not k.startswith(DCN_PREFIX)}
  dcn = {k[len(DCN_PREFIX):]: int(v) for k, v in sizes.items() if k.startswith(DCN_PREFIX)}
  unknown = sorted(set(dcn) - set(MESH_AXES))
  if unknown:
    raise MeshConfigError(f"unknown mesh axes {', '.join(f'config.mesh.dcn_{k}' for k in unknown)}")
  for name, size in dcn.items():
    if size < 1:
      raise MeshConfigError(f"config.mesh.dcn_{name}={size} must be a positive number of slices")
  return ici, {name: dcn.get(name, 1) for name in MESH_AXES}


def create_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over ``devices`` (default: all) with the four named axes, in auto-sharding mode."""
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = split_dcn(sizes)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  num_slices = math.prod(dcn.values())
  if num_slices == 1:
    shape = mesh_shape(ici, len(devices))
    return jax.make_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES, axis_types=auto,
                         devices=devices)
  if len(devices) % num_slices:
    raise MeshConfigError(f"config.mesh.dcn_* ask for {num_slices} slices, which does not "
                          f"divide the {len(devices)} devices")
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
  shape = mesh_shape(ici, len(devices) // num_slices)
  # Slices are TPU slices where devices know them; otherwise (GPU hosts) processes.
  by_process = not hasattr(devices[0], "slice_index")
  array = mesh_utils.create_hybrid_device_mesh(
      [shape[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES], devices,
      process_is_granule=by_process)
  return Mesh(array, MESH_AXES, axis_types=auto)


def current_mesh() -> jax.sharding.AbstractMesh | None:
  """The mesh set with ``jax.set_mesh`` around the running trace, or None outside one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return None
  return mesh


def batch_axes(mesh, batch_size: int | None = None, rules=RULES) -> tuple[str, ...]:
  """The mesh axes that split a batch: the data-like axes of size > 1 (that divide it)."""
  chosen: list[str] = []
  for axis in dict(rules)[BATCH]:
    size = mesh.shape[axis]
    if size == 1:
      continue
    if batch_size is not None and batch_size % (math.prod(mesh.shape[a] for a in chosen) * size):
      continue
    chosen.append(axis)
  return tuple(chosen)


def logical_to_mesh(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=RULES) -> PartitionSpec:
  """The PartitionSpec for an array of ``shape`` whose dimensions carry logical ``names``."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    target = table.get(name) if name is not None else None
    candidates = () if target is None else (target if isinstance(target, tuple) else (target,))
    chosen = []
    for axis in candidates:
      if axis in used or mesh.shape[axis] == 1:
        continue
      if size % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[axis]):
        continue
      chosen.append(axis)
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None], rules=RULES) -> jax.Array:
  """Pins an activation's sharding by the logical names of its dimensions, under the mesh of
  the running trace (``jax.set_mesh``); outside one it returns ``x`` as it is.

  Sharding propagation is free to pick different layouts for tensors that a kernel needs laid
  out alike (cuDNN attention requires query, key and value to share one), so such inputs are
  pinned here."""
  mesh = current_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_mesh(names, x.shape, mesh, rules))


def tree_shardings(values: Any, logical_specs: Any, mesh: Mesh, rules=RULES) -> Any:
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) given their logical names.

  ``logical_specs`` mirrors ``values`` with a PartitionSpec of logical names per leaf, as
  ``nnx.get_partition_spec`` returns them.
  """
  is_spec = lambda x: isinstance(x, PartitionSpec)
  spec_leaves = jax.tree.leaves(logical_specs, is_leaf=is_spec)
  value_leaves, treedef = jax.tree.flatten(values)
  if len(spec_leaves) != len(value_leaves):
    raise ValueError(f"{len(spec_leaves)} specs for {len(value_leaves)} arrays")
  shardings = [NamedSharding(mesh, logical_to_mesh(tuple(spec), np.shape(value), mesh, rules))
               for spec, value in zip(spec_leaves, value_leaves)]
  return jax.tree.unflatten(treedef, shardings)


def batch_sharding(mesh: Mesh, ndim: int, rules=RULES) -> NamedSharding:
  """Inputs are split along the batch over every data-like axis, the rest replicated."""
  data_axes = batch_axes(mesh, rules=rules)
  first = None if not data_axes else data_axes[0] if len(data_axes) == 1 else data_axes
  return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))

"""The device mesh and the logical-axis rules: the one place that maps model names to devices.

Mesh axes:
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  expert  expert parallelism: MoE weights split by expert (and the batch, outside MoE layers)
  tensor  tensor parallelism over heads and the FFN hidden width

``config.mesh`` (``MeshConfig``) gives the devices per axis within a slice (one axis may be -1 to
take the rest) and, for jobs of several TPU slices (or GPU hosts) joined over the data-center
network (DCN), the slices along each axis (``dcn_*``). Only the data-parallel axes may span
slices: their collectives (the gradient reduction, FSDP's gathers) tolerate DCN bandwidth, while
the expert all-to-all and tensor-parallel reductions run every layer and must stay on the
slices' own interconnect (ICI). Parameters carry logical names (``ecdit_jax.parallel.axes``);
``RULES`` maps each to a mesh axis. A dimension is left unsharded when its size does not divide
evenly or when its mesh axis is already used by another dimension of the same array.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ecdit_jax.errors import ConfigError
from ecdit_jax.parallel import axes

MESH_AXES = ("data", "fsdp", "expert", "tensor")
DCN_AXES = ("data", "fsdp")  # the axes that may span slices
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


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """``config.mesh``: how the devices are used. Checked when built; errors name the key."""

  data: int = -1  # devices per slice along each axis; one of the four may be -1 (the rest)
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1
  dcn_data: int = 1  # slices (TPU slices, or GPU hosts) along each axis
  dcn_fsdp: int = 1
  dcn_expert: int = 1  # must stay 1: the expert all-to-all runs on ICI only
  dcn_tensor: int = 1  # must stay 1: tensor-parallel reductions run on ICI only
  # Lets a mesh axis take part of a physical TPU torus axis, for per-slice shapes that are not a
  # product of whole physical axes (e.g. fsdp=8 x expert=8 on a 4x4x4 v4 slice).
  allow_split_physical_axes: bool = False
  # The expert axis also splits the dense weights (attention, adaLN, dense FFNs, embeddings,
  # router) along their model dimension, as fsdp does, and their EMA and optimizer state with
  # them: less memory a device, for an all-gather of each such weight over the expert axis where
  # it is used. The batch is split over the expert axis either way.
  dense_over_expert: bool = False

  def __post_init__(self):
    for name in MESH_AXES:
      size = getattr(self, name)
      if not isinstance(size, int) or size == 0 or size < -1:
        raise ConfigError(f"config.mesh.{name}={size!r} must be a positive size or -1")
      slices = getattr(self, f"dcn_{name}")
      if not isinstance(slices, int) or slices < 1:
        raise ConfigError(f"config.mesh.dcn_{name}={slices!r} must be a positive number of "
                          f"slices")
      if name not in DCN_AXES and slices > 1:
        raise ConfigError(
            f"config.mesh.dcn_{name}={slices}: only {', '.join(DCN_AXES)} may span slices; "
            f"the {name} axis exchanges activations in every layer and must stay within a "
            f"slice's interconnect (ICI). Span slices with config.mesh.dcn_data or dcn_fsdp")
    for name in ("allow_split_physical_axes", "dense_over_expert"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"config.mesh.{name}={getattr(self, name)!r} must be True or False")
    fill = [name for name in MESH_AXES if getattr(self, name) == -1]
    if len(fill) > 1:
      raise ConfigError(f"only one mesh axis may be -1, got {', '.join(fill)}")

  @classmethod
  def parse(cls, text: str, flag: str = "--mesh") -> MeshConfig | None:
    """``"expert=2,fsdp=2"`` -> axes left out are 1 and ``data`` takes the rest unless given;
    ``""`` -> None (one device). Errors name ``flag``."""
    if not text:
      return None
    sizes = {axis: 1 for axis in MESH_AXES}
    sizes["data"] = -1
    for item in text.split(","):
      axis, _, value = item.partition("=")
      axis = axis.strip()
      if axis not in MESH_AXES or not value.strip().lstrip("-").isdigit():
        raise ConfigError(f"{flag}={text!r}: expected axis=size pairs over {MESH_AXES}")
      sizes[axis] = int(value)
    try:
      return cls(**sizes)
    except ConfigError as e:
      raise ConfigError(f"{flag}={text!r}: {e}") from e

  def param_rules(self) -> tuple[tuple[str, Any], ...]:
    """The rule table for parameters: ``RULES``, with the expert axis after fsdp for the model
    dimension under ``dense_over_expert`` (an expert weight's own expert dimension takes the
    axis first)."""
    if not self.dense_over_expert:
      return RULES
    wider = {axes.EMBED: ("fsdp", "expert"), axes.TEXT_EMBED: ("fsdp", "expert")}
    return tuple((name, wider.get(name, target)) for name, target in RULES)

  @property
  def num_slices(self) -> int:
    return math.prod(getattr(self, f"dcn_{name}") for name in MESH_AXES)

  def dcn_shape(self) -> tuple[int, ...]:
    return tuple(getattr(self, f"dcn_{name}") for name in MESH_AXES)

  def shape(self, num_devices: int) -> dict[str, int]:
    """The devices per slice along each axis, with the -1 axis resolved, for ``num_devices``
    devices in all; raises ConfigError naming the keys when they do not fit."""
    if num_devices % self.num_slices:
      raise ConfigError(f"config.mesh.dcn_* ask for {self.num_slices} slices, which does not "
                        f"divide the {num_devices} devices")
    per_slice = num_devices // self.num_slices
    shape = {name: getattr(self, name) for name in MESH_AXES}
    fixed = math.prod(size for size in shape.values() if size != -1)
    fill = [name for name, size in shape.items() if size == -1]
    if fill:
      if per_slice % fixed:
        raise ConfigError(f"config.mesh.{fill[0]}=-1: {per_slice} devices are not divisible "
                          f"by the other axes' product {fixed}")
      shape[fill[0]] = per_slice // fixed
    elif fixed != per_slice:
      raise ConfigError(f"config.mesh sizes {shape} use {fixed} devices, but "
                        f"{per_slice} are available{' per slice' if self.num_slices > 1 else ''}")
    return shape

  def global_shape(self, num_devices: int) -> dict[str, int]:
    """Each axis's size across all slices (per-slice size x slices along it)."""
    shape = self.shape(num_devices)
    return {name: shape[name] * getattr(self, f"dcn_{name}") for name in MESH_AXES}


def device_grid(config: MeshConfig, devices: Sequence[Any]) -> np.ndarray:
  """The devices arranged along (data, fsdp, expert, tensor).

  Within a slice the axes follow the physical torus of TPUs (``mesh_utils``); slices are the
  outer part of the axes that span them, so each slice holds a whole per-slice mesh. Slices are
  the devices' ``slice_index`` on TPU, and processes (hosts) elsewhere.
  """
  by_process = devices[0].platform != "tpu"
  if config.num_slices > 1:
    found = len({d.process_index if by_process else d.slice_index for d in devices})
    if found != config.num_slices:
      raise ConfigError(f"config.mesh.dcn_* ask for {config.num_slices} slices, but the devices "
                        f"are in {found} {'processes' if by_process else 'TPU slices'}")
  shape = config.shape(len(devices))
  ici = tuple(shape[a] for a in MESH_AXES)
  split = config.allow_split_physical_axes
  try:
    if config.num_slices == 1:
      return mesh_utils.create_device_mesh(ici, list(devices), allow_split_physical_axes=split)
    return mesh_utils.create_hybrid_device_mesh(
        ici, config.dcn_shape(), list(devices), allow_split_physical_axes=split,
        process_is_granule=by_process)
  except (NotImplementedError, ValueError, AssertionError) as e:
    raise ConfigError(f"config.mesh {shape} per slice cannot be laid out on these devices "
                      f"({type(e).__name__}: {e}); try other sizes or "
                      f"config.mesh.allow_split_physical_axes=True") from e


def create_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over ``devices`` (default: all) with the four named axes, in auto-sharding mode."""
  devices = list(jax.devices() if devices is None else devices)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return Mesh(device_grid(config, devices), MESH_AXES, axis_types=auto)


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


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None,
              rules=RULES) -> jax.Array:
  """Pins an activation's sharding on ``mesh`` by the logical names of its dimensions; with no
  mesh (one device) it returns ``x`` as it is.

  Sharding propagation is free to pick different layouts for tensors that a kernel needs laid
  out alike (cuDNN attention requires query, key and value to share one), so such inputs are
  pinned here."""
  if mesh is None:
    return x
  spec = logical_to_mesh(names, x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


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


def in_host_memory(x: Any) -> bool:
  """Whether ``x`` (an array, or a value being traced) lives in host memory (``pinned_host``)."""
  return jax.typeof(x).memory_space == jax.memory.Space.Host


def to_device_memory(tree: Any) -> Any:
  """``tree`` with its host-memory leaves moved to device memory; inside a jitted function, a
  transfer in the program (how state offloaded to the host is brought in for computing)."""
  return jax.tree.map(
      lambda x: jax.device_put(x, jax.memory.Space.Device) if in_host_memory(x) else x, tree)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings: the target layout of a restore."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def batch_sharding(mesh: Mesh, ndim: int, rules=RULES) -> NamedSharding:
  """Inputs are split along the batch over every data-like axis, the rest replicated."""
  data_axes = batch_axes(mesh, rules=rules)
  first = None if not data_axes else data_axes[0] if len(data_axes) == 1 else data_axes
  return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))

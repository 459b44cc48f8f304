"""Device assignment on TPU slices, with stand-in device objects (no TPU is needed to lay out a
mesh): each slice holds a whole per-slice mesh, only data and fsdp span slices, and the axes
follow the physical torus."""

import dataclasses
import itertools

import numpy as np
import pytest

from ecdit_jax.errors import ConfigError
from ecdit_jax.parallel.mesh import MeshConfig, create_mesh, device_grid


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  """What the mesh code reads of a TPU device: its chip's coordinates within its slice."""

  id: int
  process_index: int
  coords: tuple[int, int, int]
  slice_index: int
  device_kind: str
  core_on_chip: int = 0
  platform: str = "tpu"


def slices(topology, count, device_kind, host=(2, 2, 1)):
  """``count`` slices of ``topology`` chips (x, y, z), hosts of ``host`` chips each."""
  x_size, y_size, z_size = topology
  per_slice = x_size * y_size * z_size
  hosts_per_slice = per_slice // np.prod(host)
  devices = []
  for s in range(count):
    for x, y, z in itertools.product(range(x_size), range(y_size), range(z_size)):
      host_id = (x // host[0]) + (x_size // host[0]) * ((y // host[1])
                                                          + (y_size // host[1]) * (z // host[2]))
      devices.append(FakeTpu(id=len(devices), process_index=s * hosts_per_slice + host_id,
                             coords=(x, y, z), slice_index=s, device_kind=device_kind))
  return devices


def _slice_of(grid):
  return np.vectorize(lambda d: d.slice_index)(grid)


def test_two_v4_128_slices_put_whole_per_slice_meshes_along_data():
  devices = slices((4, 4, 4), 2, "TPU v4")  # 2 x 64 chips
  grid = device_grid(MeshConfig(data=1, fsdp=16, expert=4, dcn_data=2), devices)
  assert grid.shape == (2, 16, 4, 1)
  assert len({d.id for d in grid.ravel()}) == 128
  np.testing.assert_array_equal(_slice_of(grid)[0], 0)
  np.testing.assert_array_equal(_slice_of(grid)[1], 1)
  # The expert all-to-all runs along one physical ring: the 4 chips of an expert group differ
  # in one coordinate only, and the two slices' groups sit at the same chips.
  for d, f in itertools.product(range(2), range(16)):
    coords = np.array([dev.coords for dev in grid[d, f, :, 0]])
    assert (np.ptp(coords, axis=0) > 0).sum() == 1
    assert [dev.coords for dev in grid[0, f, :, 0]] == [dev.coords for dev in grid[1, f, :, 0]]
  mesh = create_mesh(MeshConfig(data=1, fsdp=16, expert=4, dcn_data=2), devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 16, "expert": 4, "tensor": 1}


def test_fsdp_across_slices_is_slice_major():
  devices = slices((4, 4, 4), 2, "TPU v4")
  grid = device_grid(MeshConfig(data=1, fsdp=16, expert=4, dcn_fsdp=2), devices)
  assert grid.shape == (1, 32, 4, 1)
  np.testing.assert_array_equal(_slice_of(grid)[0, :16], 0)
  np.testing.assert_array_equal(_slice_of(grid)[0, 16:], 1)


@pytest.mark.parametrize("kind", ["TPU v5", "TPU v5p"])  # as a TPU VM and as Pathways name it
def test_a_v5p_256_slice_maps_every_axis_onto_the_torus(kind):
  devices = slices((4, 4, 8), 1, kind)  # 128 chips
  grid = device_grid(MeshConfig(data=1, fsdp=32, expert=4), devices)
  assert grid.shape == (1, 32, 4, 1) and len({d.id for d in grid.ravel()}) == 128
  for f in range(32):
    coords = np.array([dev.coords for dev in grid[0, f, :, 0]])
    assert (np.ptp(coords, axis=0) > 0).sum() == 1  # one ring for the experts


def test_shapes_that_split_a_physical_axis_need_the_setting():
  devices = slices((4, 4, 4), 1, "TPU v4")
  with pytest.raises(ConfigError, match="allow_split_physical_axes"):
    device_grid(MeshConfig(data=1, fsdp=8, expert=8), devices)  # 8 is no product of 4s
  grid = device_grid(MeshConfig(data=1, fsdp=8, expert=8, allow_split_physical_axes=True),
                     devices)
  assert grid.shape == (1, 8, 8, 1) and len({d.id for d in grid.ravel()}) == 64


def test_slice_counts_and_ici_only_axes_are_checked():
  devices = slices((4, 4, 4), 2, "TPU v4")
  with pytest.raises(ConfigError, match="ask for 4 slices, but the devices are in 2 TPU slices"):
    device_grid(MeshConfig(data=1, fsdp=8, dcn_data=4), devices)
  for axis in ("expert", "tensor"):
    with pytest.raises(ConfigError, match=f"config.mesh.dcn_{axis}=2: only data, fsdp"):
      MeshConfig(**{f"dcn_{axis}": 2})

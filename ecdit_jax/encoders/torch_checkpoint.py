"""Reads PyTorch state dicts (``torch.save`` files) into numpy arrays without importing torch.

Two layouts exist. Since torch 1.6 a checkpoint is a zip archive: ``<root>/data.pkl`` holds the
pickled object and every tensor storage is a raw little-endian file ``<root>/data/<key>``. Older
releases (and ``_use_new_zipfile_serialization=False``) write the legacy stream: a few small
pickles (magic number, protocol, system info), the object pickle, the list of storage keys, and
then each storage as an int64 element count followed by its raw bytes. Published weights often
predate torch 1.6, so both are read.

Unpickling is restricted to what a state dict needs (``OrderedDict``, the tensor/parameter
rebuild functions, the typed storage classes): any other global in the file is refused before it
is resolved, so a crafted checkpoint cannot run code. Tensors are first unpickled as references
and only turned into arrays once their storage bytes are at hand, which both layouts need.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np
from etils import epath

# The first pickle of a legacy file; the protocol number is the second.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

# Storage classes that state dicts reference, by element type. Byte order is fixed to little
# endian: both layouts record it, and big-endian files are refused rather than misread.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stands in for a torch storage class: all the reader needs is its element type."""
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  key: str
  dtype: np.dtype
  numel: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  storage: _StorageRef
  offset: int
  shape: tuple[int, ...]
  strides: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args) -> _TensorRef:
  # Trailing arguments (requires_grad, backward hooks, metadata) do not affect the values.
  if not isinstance(storage, _StorageRef):
    raise ValueError(f"tensor refers to {type(storage).__name__}, not a storage")
  return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size),
                    tuple(int(s) for s in stride))


def _rebuild_parameter(data, *unused_args):
  # A Parameter is its tensor plus requires_grad and hooks, which do not matter here.
  return data


def _allowed_globals() -> dict[tuple[str, str], Any]:
  allowed: dict[tuple[str, str], Any] = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  }
  for name, dtype in _STORAGE_DTYPES.items():
    allowed[("torch", name)] = _StorageType(dtype)
  return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _StateDictUnpickler(pickle.Unpickler):
  """Resolves only the globals of ``_ALLOWED_GLOBALS``; storages become ``_StorageRef``s."""

  def __init__(self, file, source: str):
    super().__init__(file)
    self._source = source

  def find_class(self, module: str, name: str):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"{self._source} references {module}.{name}, which a state dict does not contain; "
          "refusing to load it (only tensors, storages and OrderedDict are allowed)") from None

  def persistent_load(self, pid):
    # Both layouts: ('storage', storage type, key, location, numel[, view metadata]).
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"{self._source}: unsupported persistent id {pid!r:.100}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"{self._source}: storage of unknown type {storage_type!r}")
    if len(pid) == 6 and pid[5] is not None:
      raise pickle.UnpicklingError(f"{self._source}: storage views (torch < 0.4) are unsupported")
    return _StorageRef(str(key), storage_type.dtype, int(numel))


def _unpickle(data: bytes | BinaryIO, source: str) -> Any:
  file = io.BytesIO(data) if isinstance(data, bytes) else data
  return _StateDictUnpickler(file, source).load()


def _tensor_to_array(ref: _TensorRef, storage: np.ndarray, source: str) -> np.ndarray:
  if len(ref.shape) != len(ref.strides) or min(ref.shape + ref.strides, default=0) < 0:
    raise ValueError(f"{source}: malformed tensor of shape {ref.shape}, strides {ref.strides}")
  if 0 in ref.shape:
    return np.zeros(ref.shape, storage.dtype)
  # as_strided reads whatever memory the strides point at: check the last element lies inside.
  last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.strides))
  if ref.offset < 0 or last >= storage.size:
    raise ValueError(f"{source}: tensor of shape {ref.shape} reaches element {last} of a "
                     f"storage of {storage.size}")
  view = np.lib.stride_tricks.as_strided(
      storage[ref.offset:], shape=ref.shape,
      strides=tuple(s * storage.itemsize for s in ref.strides), writeable=False)
  return np.array(view, order="C", copy=True)


def _materialize(obj: Any, read_storage: Callable[[_StorageRef], np.ndarray], source: str) -> Any:
  """Replaces every ``_TensorRef`` inside dicts, lists and tuples by its numpy array."""
  cache: dict[str, np.ndarray] = {}

  def storage_array(ref: _StorageRef) -> np.ndarray:
    if ref.key not in cache:
      cache[ref.key] = read_storage(ref)
    return cache[ref.key]

  def convert(value):
    if isinstance(value, _TensorRef):
      return _tensor_to_array(value, storage_array(value.storage), source)
    if isinstance(value, dict):
      return {k: convert(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return type(value)(convert(v) for v in value)
    return value

  return convert(obj)


def _storage_from_bytes(ref: _StorageRef, raw: bytes, source: str) -> np.ndarray:
  expected = ref.numel * ref.dtype.itemsize
  if len(raw) < expected:
    raise ValueError(f"{source}: storage {ref.key} holds {len(raw)} bytes, expected {expected}")
  return np.frombuffer(raw, dtype=ref.dtype, count=ref.numel)


def _select_state_dict(obj: Any, source: str) -> dict:
  # Training checkpoints often wrap the weights as {"state_dict": ..., "epoch": ...}.
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"{source} holds a {type(obj).__name__}, not a state dict")
  return obj


def _read_zip(file, source: str) -> Any:
  with zipfile.ZipFile(file) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{source} is a zip archive but not a torch.save checkpoint "
                       f"(found {len(pickles)} top-level data.pkl entries)")
    root = pickles[0][:-len("data.pkl")]
    if root + "byteorder" in names and archive.read(root + "byteorder").strip() != b"little":
      raise ValueError(f"{source} was written on a big-endian machine, which is unsupported")
    state_dict = _select_state_dict(_unpickle(archive.read(pickles[0]), source), source)

    def read_storage(ref: _StorageRef) -> np.ndarray:
      entry = f"{root}data/{ref.key}"
      if entry not in names:
        raise ValueError(f"{source} lacks the storage entry {entry}")
      return _storage_from_bytes(ref, archive.read(entry), source)

    return _materialize(state_dict, read_storage, source)


def _read_legacy(file, source: str) -> Any:
  try:
    magic = _unpickle(file, source)
  except Exception as error:  # any failure here means the file is not in this format
    raise ValueError(f"{source} is neither a zip nor a legacy torch.save checkpoint "
                     f"({error})") from None
  if magic != _LEGACY_MAGIC_NUMBER:
    raise ValueError(f"{source} is not a torch.save checkpoint (unexpected header); re-save it "
                     "with torch.save in a recent torch release")
  protocol = _unpickle(file, source)
  if protocol != _LEGACY_PROTOCOL_VERSION:
    raise ValueError(f"{source}: unsupported legacy protocol {protocol}")
  system_info = _unpickle(file, source)
  if not system_info.get("little_endian", True):
    raise ValueError(f"{source} was written on a big-endian machine, which is unsupported")
  obj = _unpickle(file, source)
  storage_keys = _unpickle(file, source)
  if not isinstance(storage_keys, list):
    raise ValueError(f"{source}: malformed legacy storage table")

  # The storages follow in the order of storage_keys, each prefixed by its element count. Their
  # types are known only from the tensors that use them, so collect the references first.
  refs: dict[str, _StorageRef] = {}

  def collect(value):
    if isinstance(value, _TensorRef):
      refs[value.storage.key] = value.storage
    elif isinstance(value, dict):
      for item in value.values():
        collect(item)
    elif isinstance(value, (list, tuple)):
      for item in value:
        collect(item)

  collect(obj)
  storages: dict[str, np.ndarray] = {}
  for key in storage_keys:
    header = file.read(8)
    ref = refs.get(str(key))
    if ref is None:  # without a tensor using it, its element size (and length) is unknown
      raise ValueError(f"{source}: storage {key} is not referenced by any tensor")
    if len(header) < 8 or struct.unpack("<q", header)[0] != ref.numel:
      raise ValueError(f"{source}: storage {key} is truncated or does not hold the "
                       f"{ref.numel} elements its tensors expect")
    raw = file.read(ref.numel * ref.dtype.itemsize)
    storages[ref.key] = _storage_from_bytes(ref, raw, source)
  state_dict = _select_state_dict(obj, source)

  def read_storage(ref: _StorageRef) -> np.ndarray:
    if ref.key not in storages:
      raise ValueError(f"{source} lacks the data of storage {ref.key}")
    return storages[ref.key]

  return _materialize(state_dict, read_storage, source)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a ``torch.save`` state dict (zip or legacy format), as numpy arrays.

  Arrays keep the checkpoint's dtypes (bfloat16 as ``ml_dtypes.bfloat16``) and are contiguous
  copies, whatever the strides of the saved tensors. A checkpoint whose top level is a dict with
  a ``state_dict`` entry yields that entry. Entries that are not tensors raise ValueError.
  """
  path = epath.Path(path)
  source = os.fspath(path)
  if not path.exists():
    raise FileNotFoundError(f"no PyTorch checkpoint at {source}")
  with path.open("rb") as file:
    if zipfile.is_zipfile(file):
      file.seek(0)
      state_dict = _read_zip(file, source)
    else:
      file.seek(0)
      state_dict = _read_legacy(file, source)
  result = {}
  for key, value in state_dict.items():
    if not isinstance(key, str) or not isinstance(value, np.ndarray):
      raise ValueError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
    result[key] = value
  return result

"""Reading and writing PyTorch-layout checkpoints for NNX modules whose names mirror their keys.

The encoders in this package name their submodules after the checkpoint's keys, so a
parameter's path in the module tree is its key (``kernel``/``scale``/``embedding`` stored as
``weight``). ``load_parameters`` walks an abstract module, reads each tensor from a reader,
checks its shape, converts the PyTorch layout and returns the filled module; ``save_parameters``
is its inverse. ``open_checkpoint`` reads safetensors files one tensor at a time and only from
the shards that hold wanted keys, so a checkpoint with parts the module does not use (a T5
decoder, say) is never read whole. Directories may be local or in a bucket (gs://...): files are
read through ``etils.epath``, a tensor as one ranged read of its bytes, so nothing is copied to
a local disk first. PyTorch ``.bin`` files are pickles and are never read:
``encoders/convert_torch.py`` turns them into safetensors once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors.numpy import save_file

from ecdit_jax.errors import ConfigError
from ecdit_jax.fileio import read_json

_STORED_AS_WEIGHT = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def dataclass_from_mapping(cls, values: dict):
  """Dataclass ``cls`` from the keys of ``values`` that are its fields (checkpoint configs carry
  many more); the fields not given keep their defaults."""
  names = {field.name for field in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in values.items() if k in names})


def config_file(model_dir: str | os.PathLike, kind: str) -> epath.Path:
  """``model_dir/config.json``; a missing directory or file raises, naming it."""
  model_dir = epath.Path(model_dir)
  if not model_dir.is_dir():
    raise FileNotFoundError(f"{kind} model directory not found: {model_dir}")
  path = model_dir / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{kind} config not found: {path}")
  return path



def checkpoint_key(path: Sequence) -> str:
  """The checkpoint key of the parameter at ``path`` in the module tree."""
  *modules, leaf = (str(part) for part in path)
  return ".".join([*modules, _STORED_AS_WEIGHT.get(leaf, leaf)])


def checkpoint_axes(leaf: str, ndim: int) -> tuple[int, ...]:
  """For each axis of our parameter, its axis in the checkpoint.

  PyTorch stores Linear weights as (out, in) and Conv weights as (out, in, h, w); ours are
  (in, out) and (h, w, in, out).
  """
  if leaf == "kernel" and ndim == 2:
    return (1, 0)
  if leaf == "kernel" and ndim == 4:
    return (2, 3, 1, 0)
  return tuple(range(ndim))


def _weight_files(names: Sequence[str]) -> str:
  return " or ".join(f"{name}[.index.json]" for name in names)


def _locate(model_dir: str, names: Sequence[str]) -> tuple[str, bool] | None:
  """(path, is_index) of the first of ``names`` present as a file or as ``<name>.index.json``."""
  present = {path.name for path in epath.Path(model_dir).iterdir()}
  for name in names:
    if name in present:
      return str(epath.Path(model_dir) / name), False
    if name + ".index.json" in present:
      return str(epath.Path(model_dir) / (name + ".index.json")), True
  return None


class CheckpointReader:
  """Which file holds each key of a single-file or sharded checkpoint; subclasses read tensors.

  ``listing`` is the file (or index) that should hold every key. The first of ``names`` found in
  ``model_dir`` is used; a sharded checkpoint's keys come from its index, so that shards are
  opened only when one of their tensors is read.
  """

  def __init__(self, model_dir: str | os.PathLike, names: Sequence[str]):
    model_dir = os.fspath(model_dir)
    found = _locate(model_dir, names)
    if found is None:
      raise FileNotFoundError(f"no {_weight_files(names)} in {model_dir}")
    self.listing, is_index = found
    if is_index:
      weight_map = read_json(self.listing)["weight_map"]
      self._file_of = {key: str(epath.Path(model_dir) / shard)
                       for key, shard in weight_map.items()}
    else:
      self._file_of = dict.fromkeys(self._keys_of_single_file(self.listing), self.listing)

  def _keys_of_single_file(self, file: str) -> Sequence[str]:
    raise NotImplementedError

  def __contains__(self, key: str) -> bool:
    return key in self._file_of

  def __iter__(self):
    return iter(self._file_of)

  def keys(self):
    return self._file_of.keys()

  def file_of(self, key: str) -> str:
    return self._file_of[key]

  def read(self, key: str) -> np.ndarray:
    raise NotImplementedError

  def close(self):
    pass

  def _missing_from_shard(self, key: str) -> KeyError:
    return KeyError(f"parameter {key} is listed in {self.listing} but missing from "
                    f"{self._file_of[key]}")


def _shard_must_exist(file: str):
  if not epath.Path(file).is_file():
    raise FileNotFoundError(f"checkpoint shard not found: {file}")


# The safetensors dtype names, little-endian as the format stores them.
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": jnp.bfloat16, "I64": "<i8",
           "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


class SafetensorsFile:
  """One safetensors file, local or in a bucket: its header read once, then each tensor with
  one ranged read. The format: an 8-byte little-endian header size, a JSON header giving each
  tensor's dtype, shape and byte range, then the bytes."""

  def __init__(self, path: str | os.PathLike):
    self.path = epath.Path(path)
    self._file = self.path.open("rb")
    try:
      (size,) = struct.unpack("<Q", self._file.read(8))
      header = json.loads(self._file.read(size))
    except (struct.error, ValueError) as e:
      self._file.close()
      raise ValueError(f"{self.path} is not a safetensors file ({e})") from e
    header.pop("__metadata__", None)
    self._entries, self._start = header, 8 + size

  def keys(self):
    return self._entries.keys()

  def get_tensor(self, key: str) -> np.ndarray:
    entry = self._entries[key]
    begin, end = entry["data_offsets"]
    if entry["dtype"] not in _DTYPES:
      raise ValueError(f"{key} in {self.path} has dtype {entry['dtype']}, which is not read")
    self._file.seek(self._start + begin)
    data = self._file.read(end - begin)
    return np.frombuffer(data, np.dtype(_DTYPES[entry["dtype"]])).reshape(entry["shape"])

  def close(self):
    self._file.close()


class SafetensorsReader(CheckpointReader):
  """Single tensors from ``<name>`` or the shards of ``<name>.index.json``, read on demand.

  ``names`` are the file names to look for, in order (e.g. diffusers' own name, then the
  generic one).
  """

  def __init__(self, model_dir: str | os.PathLike,
               names: Sequence[str] = ("model.safetensors",)):
    self._stack = contextlib.ExitStack()
    self._handles = {}
    super().__init__(model_dir, names)

  def _keys_of_single_file(self, file: str) -> Sequence[str]:
    return self._open(file)[1]

  def _open(self, file: str):
    if file not in self._handles:
      _shard_must_exist(file)
      handle = self._stack.enter_context(contextlib.closing(SafetensorsFile(file)))
      self._handles[file] = handle, set(handle.keys())
    return self._handles[file]

  def read(self, key: str) -> np.ndarray:
    handle, keys = self._open(self._file_of[key])
    if key not in keys:
      raise self._missing_from_shard(key)
    return handle.get_tensor(key)

  def close(self):
    self._stack.close()


def open_checkpoint(model_dir: str | os.PathLike,
                    safetensors_names: Sequence[str] = ("model.safetensors",),
                    bin_names: Sequence[str] = ("pytorch_model.bin",)) -> CheckpointReader:
  """A reader of the safetensors weights in ``model_dir``.

  Each name is looked for as a single file and as a sharded ``<name>.index.json``, in order.
  PyTorch ``.bin`` files (``bin_names``) are pickles and are not read: a directory that holds
  only those raises ConfigError naming the one-off converter; one with neither raises
  FileNotFoundError listing every name looked for.
  """
  model_dir = os.fspath(model_dir)
  if _locate(model_dir, safetensors_names):
    return SafetensorsReader(model_dir, safetensors_names)
  found = _locate(model_dir, bin_names)
  if found:
    raise ConfigError(
        f"{model_dir} holds PyTorch weights ({epath.Path(found[0]).name}), which are pickles "
        f"and are not read at run time; convert them once to safetensors with "
        f"`python -m ecdit_jax.encoders.convert_torch {model_dir}` (needs torch)")
  names = (*safetensors_names, *bin_names)
  raise FileNotFoundError(f"no {_weight_files(names)} in {model_dir}")


def load_parameters(abstract_module: nnx.Module, reader: CheckpointReader, *,
                    stored_key: Callable[[str], str] | None = None) -> nnx.Module:
  """``abstract_module`` (from ``nnx.eval_shape``) with every parameter read from ``reader``.

  ``stored_key(key)`` maps a parameter's key to the key it is stored under (for alternative
  names); by default the key itself, which must be present. Tensors are cast to float32; a
  missing key or a wrong shape raises, naming the key and the file.
  """
  graphdef, abstract_state = nnx.split(abstract_module)
  loaded = []
  for path, variable in nnx.to_flat_state(abstract_state):
    key = checkpoint_key(path)
    if stored_key is not None:
      key = stored_key(key)
    elif key not in reader:
      raise KeyError(f"parameter {key} is missing from {reader.listing}")
    array = reader.read(key)
    axes = checkpoint_axes(str(path[-1]), len(variable.shape))
    expected = tuple(variable.shape[axes.index(axis)] for axis in range(len(axes)))
    if len(expected) == 2 and tuple(array.shape) == (*expected, 1, 1):
      # Some converted checkpoints store linear projections as 1x1 convolutions.
      array = array.reshape(expected)
    if tuple(array.shape) != expected:
      raise ValueError(f"parameter {key} in {reader.file_of(key)} has shape "
                       f"{tuple(array.shape)}, expected {expected}")
    array = np.asarray(array, dtype=np.float32).transpose(axes)
    loaded.append((path, variable.replace(jnp.asarray(array))))
  return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def checkpoint_tensors(module: nnx.Module) -> dict[str, np.ndarray]:
  """Every ``nnx.Param`` of ``module`` under its checkpoint key, in the PyTorch layout.

  The inverse of what ``load_parameters`` does to each tensor, dtypes kept. Two parameters that
  would share a key raise ValueError.
  """
  tensors = {}
  for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    key = checkpoint_key(path)
    if key in tensors:
      raise ValueError(f"two parameters are stored under {key}")
    value = np.asarray(variable[...])
    axes = checkpoint_axes(str(path[-1]), value.ndim)
    # load_parameters applies transpose(axes); argsort(axes) undoes it.
    tensors[key] = np.ascontiguousarray(value.transpose(np.argsort(axes)))
  return tensors


def save_parameters(module: nnx.Module, path: str | os.PathLike) -> None:
  """Writes every parameter of ``module`` to the safetensors file ``path`` as Hugging Face
  stores it (key names and PyTorch layout), so that ``load_parameters`` and the PyTorch
  libraries read it back."""
  # transformers refuses safetensors files whose metadata does not name their framework.
  save_file(checkpoint_tensors(module), os.fspath(path), metadata={"format": "pt"})

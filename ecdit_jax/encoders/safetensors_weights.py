"""Loading PyTorch-layout safetensors checkpoints into NNX modules whose names mirror their keys.

The encoders in this package name their submodules after the checkpoint's keys, so a
parameter's path in the module tree is its key (``kernel``/``scale``/``embedding`` stored as
``weight``). ``load_parameters`` walks an abstract module, reads each tensor from a
``SafetensorsReader``, checks its shape, converts the PyTorch layout and returns the filled
module. Tensors are read one at a time and only from the shards that hold wanted keys, so a
checkpoint with parts the module does not use (a T5 decoder, say) is never read whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

_STORED_AS_WEIGHT = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def dataclass_from_mapping(cls, values: dict):
  """Dataclass ``cls`` from the keys of ``values`` that are its fields (checkpoint configs carry
  many more); the fields not given keep their defaults."""
  names = {field.name for field in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in values.items() if k in names})


def config_file(model_dir: str | os.PathLike, kind: str) -> str:
  """``model_dir/config.json``; a missing directory or file raises, naming it."""
  model_dir = os.fspath(model_dir)
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"{kind} model directory not found: {model_dir}")
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
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


class SafetensorsReader:
  """Single tensors from ``<name>`` or the shards of ``<name>.index.json``, read on demand.

  ``names`` are the file names to look for, in order (e.g. diffusers' own name, then the
  generic one). ``listing`` is the file (or index) that should hold every key.
  """

  def __init__(self, model_dir: str, names: Sequence[str] = ("model.safetensors",)):
    self._stack = contextlib.ExitStack()
    self._handles = {}
    for name in names:
      single, index = os.path.join(model_dir, name), os.path.join(model_dir, name + ".index.json")
      if os.path.isfile(single):
        self.listing = single
        self._file_of = dict.fromkeys(self._open(single)[1], single)
        return
      if os.path.isfile(index):
        self.listing = index
        with open(index, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
        self._file_of = {key: os.path.join(model_dir, shard) for key, shard in weight_map.items()}
        return
    wanted = " or ".join(f"{name}[.index.json]" for name in names)
    raise FileNotFoundError(f"no {wanted} in {model_dir}")

  def _open(self, file: str):
    if file not in self._handles:
      if not os.path.isfile(file):
        raise FileNotFoundError(f"checkpoint shard not found: {file}")
      handle = self._stack.enter_context(safe_open(file, framework="np"))
      self._handles[file] = handle, set(handle.keys())
    return self._handles[file]

  def __contains__(self, key: str) -> bool:
    return key in self._file_of

  def keys(self):
    return self._file_of.keys()

  def file_of(self, key: str) -> str:
    return self._file_of[key]

  def read(self, key: str) -> np.ndarray:
    file = self._file_of[key]
    handle, keys = self._open(file)
    if key not in keys:
      raise KeyError(f"parameter {key} is listed in {self.listing} but missing from {file}")
    return handle.get_tensor(key)

  def close(self):
    self._stack.close()


def load_parameters(abstract_module: nnx.Module, reader: SafetensorsReader, *,
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

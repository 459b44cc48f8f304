"""On-disk format of precomputed VAE latents (written by ``ecdit_jax.precompute``).

A latent directory holds ArrayRecord files ``latents-PPPPP-of-NNNNN-CCCCC.array_record`` (chunk
C written by process P of N). Each record is ``flax.serialization.msgpack_serialize`` of
``{"latent": float32 (h, w, C), "caption": str}`` and, when the captions were encoded too,
``"context"``: the frozen text encoder's states of the caption's valid tokens (n, width), in the
encoder's dtype (bfloat16 by default); the padding after them is left out (the DiT masks it).
Such a directory also holds ``null_context.msgpack``, the empty caption's states padded to the
full length, and its info.json says which encoder wrote them (``text_context``). A chunk is
complete only once its empty ``<chunk>.done`` marker exists: the marker is written after the
writer is closed, so a chunk interrupted mid-write has none and is rewritten on resume.
``info.json`` (written by process 0) records the latent shape and dtype, the counts and what the
latents were computed from.

The directory may be local or in a bucket (gs://...): files are read and written through
``etils.epath``, and ArrayRecord reads gs:// chunks itself.

Only numpy, PIL, epath, array_record and flax.serialization are used: the data package must not
depend on the model or the encoders.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np
from etils import epath
from flax import serialization
from PIL import Image

from ecdit_jax.fileio import is_url, write_atomic

INFO_FILE = "info.json"
NULL_CONTEXT_FILE = "null_context.msgpack"
DONE_SUFFIX = ".done"
_CHUNK_RE = re.compile(r"^latents-\d{5}-of-\d{5}-\d{5}\.array_record$")


def chunk_path(directory: str, process_index: int, process_count: int, chunk: int) -> str:
  """The file of chunk ``chunk`` of process ``process_index`` of ``process_count``."""
  name = f"latents-{process_index:05d}-of-{process_count:05d}-{chunk:05d}.array_record"
  return str(epath.Path(directory) / name)


def encode_record(latent: np.ndarray, caption: str, context: np.ndarray | None = None) -> bytes:
  record = {"latent": np.asarray(latent, np.float32), "caption": caption}
  if context is not None:
    record["context"] = np.asarray(context)
  return serialization.msgpack_serialize(record)


def decode_record(data: bytes) -> dict[str, Any]:
  """``{"latent": float32 (h, w, C), "caption": str}`` (and ``"context"``) from a record."""
  return serialization.msgpack_restore(data)


def write_chunk(path: str, records: Iterable[bytes]) -> None:
  """Writes serialized records to ``path``, then marks the chunk complete.

  The marker comes after the file is whole so that a crash at any point leaves no marker. The
  ArrayRecord writer needs a local file: a chunk bound for a bucket is written to a temporary
  one and copied up.
  """
  path = epath.Path(path)
  if chunk_done(path):
    raise FileExistsError(f"{path} is complete; refusing to overwrite it")
  if not is_url(path):
    _write_array_record(path, records)
  else:
    with tempfile.TemporaryDirectory(prefix="ecdit_chunk_") as local:
      local_path = epath.Path(local) / path.name
      _write_array_record(local_path, records)
      local_path.copy(path, overwrite=True)
  epath.Path(f"{path}{DONE_SUFFIX}").write_bytes(b"")


def _write_array_record(path: epath.Path, records: Iterable[bytes]) -> None:
  from array_record.python import array_record_module  # native module, loaded on use

  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  try:
    for record in records:
      writer.write(record)
  finally:
    writer.close()


def chunk_done(path) -> bool:
  return epath.Path(f"{path}{DONE_SUFFIX}").exists()


def latent_files(directory: str) -> list[str]:
  """The completed chunk files of ``directory``, sorted by name (process, then chunk): one
  listing, so a bucket with thousands of chunks is asked once."""
  directory = epath.Path(directory)
  if not directory.exists():
    return []
  names = {path.name for path in directory.iterdir()}
  return sorted(str(directory / name) for name in names
                if _CHUNK_RE.match(name) and name + DONE_SUFFIX in names)


def read_info(directory: str) -> dict[str, Any] | None:
  path = epath.Path(directory) / INFO_FILE
  return json.loads(path.read_text()) if path.exists() else None


def write_info(directory: str, info: dict[str, Any]) -> None:
  write_atomic(epath.Path(directory) / INFO_FILE, json.dumps(info, indent=2, sort_keys=True))


def write_null_context(directory: str, context: np.ndarray, length: int) -> None:
  """The empty caption's encoder states (max_len, width) and valid length."""
  write_atomic(epath.Path(directory) / NULL_CONTEXT_FILE, serialization.msgpack_serialize(
      {"context": np.asarray(context), "length": int(length)}))


def read_null_context(directory: str) -> tuple[np.ndarray, int] | None:
  path = epath.Path(directory) / NULL_CONTEXT_FILE
  if not path.exists():
    return None
  values = serialization.msgpack_restore(path.read_bytes())
  return np.asarray(values["context"]), int(values["length"])


class LatentSource:
  """Random access to the records of all completed chunks of a latent directory.

  ``source[i]`` is ``{"latent": float32 (h, w, C), "caption": bytes}`` (bytes like a TFDS text
  feature, so the grain pipeline can tokenize it the same way), plus ``"context"`` when the
  directory holds encoded captions. Records are ordered by chunk
  file name, i.e. process-major: with one process this is the source order.
  """

  def __init__(self, directory: str):
    from array_record.python import array_record_data_source

    self.directory = directory
    self.paths = latent_files(directory)
    if not self.paths:
      raise FileNotFoundError(f"no completed latent chunks in {directory}")
    self._source = array_record_data_source.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = decode_record(self._source[index])
    out = {"latent": np.asarray(record["latent"], np.float32),
           "caption": record["caption"].encode("utf-8")}
    if "context" in record:
      out["context"] = np.asarray(record["context"])
    return out

  def __repr__(self) -> str:
    return f"LatentSource({self.directory!r}, {len(self)} records)"


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Center square crop then bicubic resize to uint8 (size, size, 3).

  Accepts (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8; gray and RGBA become RGB (alpha is
  dropped, as the VAE has no use for it).
  """
  pil = Image.fromarray(np.asarray(image, np.uint8).squeeze(-1)
                        if np.ndim(image) == 3 and np.shape(image)[-1] == 1
                        else np.asarray(image, np.uint8))
  pil = pil.convert("RGB")
  width, height = pil.size
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  pil = pil.crop((left, top, left + side, top + side))
  if side != size:
    pil = pil.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(pil, np.uint8)

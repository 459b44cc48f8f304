"""Paths of local disks and buckets (gs://) alike: URLs kept whole, files written so that a
reader never sees half of one."""

from __future__ import annotations

import json
import os
import uuid

from etils import epath


def write_atomic(path, data: bytes | str) -> None:
  """Writes ``data`` so that no reader sees part of it. Locally: to a temporary name beside
  ``path`` (parents created), then renamed over it; several processes may write the same file
  at once, each with its own name. In a bucket an object appears whole when its upload ends,
  so it is written in place (a rename there is a copy)."""
  path = epath.Path(path)
  if is_url(path):
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp{uuid.uuid4().hex}"
  try:
    if isinstance(data, str):
      tmp.write_text(data)
    else:
      tmp.write_bytes(data)
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()


def is_url(path) -> bool:
  """Whether ``path`` names a bucket object or prefix (gs://..., s3://...) rather than a local
  file."""
  return "://" in os.fspath(path)


def absolute(path) -> str:
  """``path`` made absolute (and ``~`` expanded) if local; a URL as it is."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def read_json(path) -> dict:
  """A JSON file's contents, local or in a bucket."""
  return json.loads(epath.Path(path).read_text(encoding="utf-8"))


def files_under(directory) -> list[epath.Path]:
  """Every file below ``directory``, at any depth (``glob("**")`` is refused by epath)."""
  return [root / name for root, _, names in epath.Path(directory).walk() for name in names]

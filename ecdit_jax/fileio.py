"""Writing files so that a reader never sees half of one: local paths and gs:// alike."""

from __future__ import annotations

import uuid

from etils import epath


def write_atomic(path, data: bytes | str) -> None:
  """Writes ``data`` to a temporary name beside ``path`` (parents created), then renames it
  over ``path``. Several processes may write the same file at once: each uses its own name."""
  path = epath.Path(path)
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

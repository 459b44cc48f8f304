"""Images out: [-1, 1] floats to uint8, PNG files, and captioned grids."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from ecdit_jax.fileio import write_atomic


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 pixels."""
  return np.asarray(np.clip((np.asarray(images) + 1.0) * 127.5 + 0.5, 0, 255), np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def write_png(path, image: np.ndarray) -> None:
  write_atomic(path, png_bytes(image))


def write_pngs(images: np.ndarray, outdir, first_index: int = 0) -> list[str]:
  """``images`` as OUTDIR/NNNNN.png, numbered from ``first_index``."""
  outdir = epath.Path(outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  paths = []
  for offset, image in enumerate(images):
    path = outdir / f"{first_index + offset:05d}.png"
    write_png(path, image)
    paths.append(str(path))
  return paths


def sample_grid(images: np.ndarray, prompts: Sequence[str], *, columns: int = 4,
                scale: int = 4) -> np.ndarray:
  """Images enlarged ``scale``x (nearest) with their prompt written under each."""
  n, h, w, _ = images.shape
  cell_w, caption_h = w * scale, 24
  cell_h = h * scale + caption_h
  rows = -(-n // columns)
  canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, (image, prompt) in enumerate(zip(images, prompts)):
    x, y = (i % columns) * cell_w, (i // columns) * cell_h
    tile = Image.fromarray(image).resize((cell_w, h * scale), Image.NEAREST)
    canvas.paste(tile, (x, y))
    draw.text((x + 2, y + h * scale + 2), _fit(prompt, cell_w), fill=(0, 0, 0))
  return np.asarray(canvas)


def _fit(text: str, width_px: int, char_px: int = 6) -> str:
  """Wraps a caption onto two lines of the cell's width (the default font is ~6 px wide)."""
  per_line = max(width_px // char_px, 4)
  return text[:per_line] + ("\n" + text[per_line:2 * per_line] if len(text) > per_line else "")

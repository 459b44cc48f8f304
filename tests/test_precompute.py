"""End-to-end test of ``python -m ecdit_jax.precompute`` on a folder source with a tiny VAE.

Skip rules under test: a corrupt image (with a caption) and an image without a caption are both
skipped and counted, so 7 image files give 5 records and 2 skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from ecdit_jax.data.latents import LatentSource, center_crop_resize, latent_files

pytestmark = pytest.mark.slow  # trains, or runs the tools: CI runs it, the fast lane skips it

SIZE = 16
# name -> (mode, (width, height)); captioned unless listed in NO_CAPTION.
IMAGES = {"a.png": ("RGB", (20, 24)), "b.png": ("L", (16, 16)), "c.png": ("RGBA", (30, 20)),
          "d.jpg": ("RGB", (17, 33)), "e.png": ("P", (24, 24)), "f.png": ("RGB", (12, 12))}
NO_CAPTION = {"f.png"}
CORRUPT = "bad.png"


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
      norm_num_groups=4, latent_channels=4, sample_size=16)
  path = str(tmp_path_factory.mktemp("vae"))
  model.save_pretrained(path, safe_serialization=True)
  return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for name, (mode, (width, height)) in IMAGES.items():
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").convert(mode).save(path / name)
    if name not in NO_CAPTION:
      (path / name).with_suffix(".txt").write_text(f"  caption of {name}\n")
  (path / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  (path / CORRUPT).with_suffix(".txt").write_text("a corrupt image")
  return path


def run_cli(image_dir, vae_dir, out, image_size=SIZE):
  cmd = [sys.executable, "-m", "ecdit_jax.precompute", f"--source=folder:{image_dir}",
         f"--vae={vae_dir}", f"--out={out}", f"--image_size={image_size}", "--chunk_size=2",
         "--batch_size=2"]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def dataset(out):
  source = LatentSource(str(out))
  return [source[i] for i in range(len(source))]


def test_precompute_folder_resume_and_refusal(tmp_path, image_dir, vae_dir):
  from ecdit_jax.encoders.vae import load_vae

  out = tmp_path / "latents"
  result = run_cli(image_dir, vae_dir, out)
  assert result.returncode == 0, result.stderr
  assert "wrote 5 records" in result.stdout and "skipped 2" in result.stdout

  # Sorted by name: a, b, bad (corrupt), c, d, e, f (no caption).
  kept = ["a.png", "b.png", "c.png", "d.jpg", "e.png"]
  records = dataset(out)
  assert [r["caption"] for r in records] == [f"caption of {n}".encode() for n in kept]
  images = []
  for name in kept:
    with Image.open(image_dir / name) as image:
      image = image.convert("RGBA") if image.mode == "P" else image
      images.append(center_crop_resize(np.asarray(image), SIZE))
  assert all(image.shape == (SIZE, SIZE, 3) for image in images)
  expected = np.asarray(load_vae(vae_dir).latents_from_images(
      np.stack(images).astype(np.float32) / 127.5 - 1))
  for record, want in zip(records, expected):
    assert record["latent"].dtype == np.float32 and record["latent"].shape == (8, 8, 4)
    np.testing.assert_allclose(record["latent"], want, rtol=1e-5, atol=1e-6)

  info = json.loads((out / "info.json").read_text())
  assert info["count"] == 5 and info["skipped"] == 2
  assert info["latent_shape"] == [8, 8, 4] and info["image_size"] == SIZE
  assert info["vae"] == os.path.abspath(vae_dir)

  # Resume: only the chunk whose marker is gone is rewritten.
  chunks = latent_files(str(out))
  assert len(chunks) == 4  # 7 source records in chunks of 2
  os.remove(chunks[-1] + ".done")
  mtimes = {p: os.stat(p).st_mtime_ns for p in chunks[:-1]}
  result = run_cli(image_dir, vae_dir, out)
  assert result.returncode == 0, result.stderr
  assert {p: os.stat(p).st_mtime_ns for p in chunks[:-1]} == mtimes
  assert latent_files(str(out)) == chunks
  again = dataset(out)
  assert [r["caption"] for r in again] == [r["caption"] for r in records]
  for new, old in zip(again, records):
    np.testing.assert_array_equal(new["latent"], old["latent"])
  info = json.loads((out / "info.json").read_text())
  assert info["count"] == 5 and info["skipped"] == 2

  # Other settings on the same output are refused, and nothing is touched.
  result = run_cli(image_dir, vae_dir, out, image_size=32)
  assert result.returncode != 0
  assert "--image_size=32" in result.stderr
  assert {p: os.stat(p).st_mtime_ns for p in chunks[:-1]} == mtimes


def test_center_crop_resize_modes():
  gray = np.arange(6 * 10, dtype=np.uint8).reshape(6, 10)
  out = center_crop_resize(gray, 6)  # a crop, no resize: the middle 6 columns
  assert out.shape == (6, 6, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[..., 0], gray[:, 2:8])
  rgba = np.zeros((9, 5, 4), np.uint8)
  assert center_crop_resize(rgba, 4).shape == (4, 4, 3)

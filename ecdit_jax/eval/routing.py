"""Where expert choice spends compute: experts per image token, by sampling step and MoE layer.

The counts come from the sampler itself (``inference.sampler.make_sampler(...,
record_routing=True)``): (steps, MoE layers, images, tokens) experts per token of the
conditional half. ``object_token_mask`` marks the tokens whose patch holds object pixels
(GenEval-Shapes palette segmentation of the final image), so ``object_background_ratio``
compares compute on objects with compute on background (the paper reports that objects get
more).
"""

from __future__ import annotations

import numpy as np
from etils import epath
from PIL import Image

from ecdit_jax.eval import geneval_shapes as scorer


def object_token_mask(images_uint8: np.ndarray, patch_size: int) -> np.ndarray:
  """(B, H, W, 3) uint8 -> (B, S) bool: the patch holds at least one object pixel."""
  masks = []
  for image in images_uint8:
    on_object = scorer.segment(image) >= 0
    h, w = on_object.shape
    patches = on_object.reshape(h // patch_size, patch_size, w // patch_size, patch_size)
    masks.append(patches.any(axis=(1, 3)).reshape(-1))
  return np.stack(masks)


def token_maps(counts: np.ndarray, grid_size: int) -> np.ndarray:
  """(steps, layers, B, S) -> (B, grid, grid): experts per token averaged over steps, layers."""
  mean = counts.astype(np.float64).mean(axis=(0, 1))
  return mean.reshape(mean.shape[0], grid_size, grid_size)


def object_background_ratio(counts: np.ndarray, object_mask: np.ndarray) -> float | None:
  """Mean experts per object token over mean experts per background token (all steps, layers,
  images); None when either region is empty."""
  mean = counts.astype(np.float64).mean(axis=(0, 1))  # (B, S)
  if not object_mask.any() or object_mask.all():
    return None
  return float(mean[object_mask].mean() / mean[~object_mask].mean())


def region_means(counts: np.ndarray, object_mask: np.ndarray) -> dict:
  """Mean experts per object token and per background token of ``counts`` (..., B, S), each
  None when its region is empty. With per-image routing the mean over all tokens is fixed by
  the capacity; how it splits between objects and background is what routing decides."""
  per_token = counts.astype(np.float64).reshape(-1, *object_mask.shape).mean(axis=0)
  on, off = per_token[object_mask], per_token[~object_mask]
  return {"object": float(on.mean()) if on.size else None,
          "background": float(off.mean()) if off.size else None}


def summary(counts: np.ndarray, object_mask: np.ndarray, times: np.ndarray,
            moe_layer_indices) -> dict:
  """Mean experts per token by sampling step (with its t) and by layer, each split into object
  and background tokens, and the overall object/background ratio."""
  counts = counts.astype(np.float64)
  return {
      "experts_per_token_by_step": [
          {"step": i, "t": float(times[i]), "mean": float(counts[i].mean()),
           **region_means(counts[i], object_mask)}
          for i in range(counts.shape[0])],
      "experts_per_token_by_layer": [
          {"block": int(block), "mean": float(counts[:, j].mean()),
           **region_means(counts[:, j], object_mask)}
          for j, block in enumerate(moe_layer_indices)],
      "object_token_fraction": float(object_mask.mean()),
      "object_over_background_compute": object_background_ratio(counts, object_mask),
  }


def _heat(values: np.ndarray, vmax: float) -> np.ndarray:
  """(g, g) floats -> (g, g, 3) uint8, black -> red -> yellow as values rise to vmax."""
  x = np.clip(values / max(vmax, 1e-9), 0, 1)
  return (np.stack([np.minimum(2 * x, 1), np.clip(2 * x - 1, 0, 1), np.zeros_like(x)], -1)
          * 255).astype(np.uint8)


def heatmap_panels(image: np.ndarray, token_map: np.ndarray, vmax: float,
                   side_min: int) -> Image.Image:
  """Side by side: the uint8 sample, its (g, g) map of experts per token (black -> red ->
  yellow up to ``vmax``) and the map laid over the sample, each at least ``side_min`` wide."""
  side = max(image.shape[0], side_min)
  left = Image.fromarray(image).resize((side, side), Image.NEAREST)
  right = Image.fromarray(_heat(token_map, vmax)).resize((side, side), Image.NEAREST)
  panels = Image.new("RGB", (3 * side, side))
  panels.paste(left, (0, 0))
  panels.paste(right, (side, 0))
  panels.paste(Image.blend(left.convert("RGB"), right, 0.5), (2 * side, 0))
  return panels


def write_heatmaps(images: np.ndarray, maps: np.ndarray, outdir, side_min: int) -> None:
  """OUTDIR/NNNNN.png: ``heatmap_panels`` of each image, on one colour scale (the maps' max)."""
  outdir = epath.Path(outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  vmax = float(maps.max())
  for i, (image, token_map) in enumerate(zip(images, maps)):
    with (outdir / f"{i:05d}.png").open("wb") as f:
      heatmap_panels(image, token_map, vmax, side_min).save(f, format="PNG")

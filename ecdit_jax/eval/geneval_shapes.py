"""GenEval-Shapes scorer: a deterministic detector and the six GenEval verdicts.

Scores text-image alignment of GenEval-Shapes images (docs/GENEVAL_SHAPES.md, "Scoring").
Because the generator draws flat, hard-edged shapes in a known palette, a palette segmentation
plus connected components replaces GenEval's object detector, and every verdict is exact:

1. Pixels within RGB distance 80 of their nearest palette colour, and with a brightest channel over
   100, take that colour; all others are background.
2. Objects are 4-connected components of one colour whose area is at least 35% of the smallest
   object area the generator can draw at that image size.
3. Shape from the fill ratio area / bbox area: >= 0.88 square, 0.64..0.88 circle, < 0.64 triangle.
4. Category verdicts as in GenEval, except that the image must hold exactly the objects the
   caption names (see ``score_image``); the overall score is the mean of the per-category
   accuracies.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from collections.abc import Sequence

import numpy as np

from ecdit_jax.data import geneval_shapes as gen

COLOR_DISTANCE_THRESHOLD = 80.0
MIN_BRIGHTNESS = 100
MIN_AREA_FRACTION = 0.35
SQUARE_MIN_FILL = 0.88
CIRCLE_MIN_FILL = 0.64
POSITION_MARGIN_FRACTION = 0.1
# Offset of the streams that evaluation prompts are drawn from (one per category), far from the
# dataset's train/test streams so that prompts never repeat the training captions' random draws.
EVAL_PROMPT_STREAM = 1000

_PALETTE_RGB = np.array([gen.PALETTE[c] for c in gen.COLORS], dtype=np.int64)  # (6, 3)
_NUMBER_OF_WORD = {word: n for n, word in gen.COUNT_WORDS.items()}


@dataclasses.dataclass(frozen=True)
class DetectedObject:
  """A detected object; ``bbox`` is (x0, y0, x1, y1) with x1/y1 exclusive, centroid is (x, y)."""

  shape: str
  color: str
  area: int
  bbox: tuple[int, int, int, int]
  centroid: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A parsed caption.

  ``shapes`` lists the named shapes in caption order; ``colors`` is aligned with ``shapes`` when
  the caption names colours (colors, color_attr) and empty otherwise; ``count`` is N for counting
  and None otherwise; ``relation`` is the position relation or None.
  """

  category: str
  caption: str
  shapes: tuple[str, ...]
  colors: tuple[str, ...] = ()
  count: int | None = None
  relation: str | None = None


# ----------------------------------------------------------------------------------------------
# Detection.


def segment(image: np.ndarray) -> np.ndarray:
  """(H, W) int map: the palette index (into ``COLORS``) of each pixel, -1 for background."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
  if not (np.issubdtype(image.dtype, np.integer) or image.dtype == bool):
    # Float images are ambiguous ([0, 1], [-1, 1] or [0, 255]); the caller must quantise.
    raise ValueError(f"expected integer RGB in [0, 255] (e.g. uint8), got dtype {image.dtype}")
  rgb = image.astype(np.int64)
  sq_dist = np.sum((rgb[:, :, None, :] - _PALETTE_RGB[None, None]) ** 2, axis=-1)  # (H, W, 6)
  nearest = np.argmin(sq_dist, axis=-1)
  nearest_sq = np.take_along_axis(sq_dist, nearest[..., None], axis=-1)[..., 0]
  is_color = (nearest_sq < COLOR_DISTANCE_THRESHOLD**2) & (rgb.max(axis=-1) > MIN_BRIGHTNESS)
  return np.where(is_color, nearest, -1)


def _label_components(seg: np.ndarray) -> np.ndarray:
  """4-connected components of equal non-negative values; labels are flat pixel indices, -1 bg.

  Vectorised min-label propagation: every pixel starts with its own flat index and repeatedly
  takes the minimum over its same-colour 4-neighbours, with pointer jumping (a label is itself a
  pixel of the same component, so that pixel's label may be adopted) to converge in few sweeps.
  """
  h, w = seg.shape
  fg = seg >= 0
  none = h * w  # larger than every flat index: neutral for the minimum
  labels = np.where(fg, np.arange(h * w).reshape(h, w), none)
  link_x = fg[:, :-1] & (seg[:, :-1] == seg[:, 1:])  # pixel joined to its right neighbour
  link_y = fg[:-1, :] & (seg[:-1, :] == seg[1:, :])  # pixel joined to the one below
  fg_flat = fg.ravel()
  while True:
    new = labels.copy()
    new[:, :-1] = np.minimum(new[:, :-1], np.where(link_x, labels[:, 1:], none))
    new[:, 1:] = np.minimum(new[:, 1:], np.where(link_x, labels[:, :-1], none))
    new[:-1, :] = np.minimum(new[:-1, :], np.where(link_y, labels[1:, :], none))
    new[1:, :] = np.minimum(new[1:, :], np.where(link_y, labels[:-1, :], none))
    flat = new.reshape(-1)
    flat[fg_flat] = flat[flat[fg_flat]]
    if np.array_equal(new, labels):
      break
    labels = new
  return np.where(fg, labels, -1)


@functools.lru_cache(maxsize=None)
def min_object_area(image_size: int) -> int:
  """Smallest pixel area the generator can draw at ``image_size``: the smallest shape at min side.

  Rasterised with the generator's own drawing routine, so the threshold follows its geometry.
  """
  side = max(gen.min_object_side(image_size), 1)
  areas = []
  for shape in gen.SHAPES:
    canvas = np.zeros((side, side, 3), dtype=np.uint8)
    gen.draw_shape(canvas, shape, gen.PALETTE[gen.COLORS[0]], (0, 0, side, side))
    areas.append(int(canvas.any(axis=-1).sum()))
  return min(areas)


def classify_shape(fill_ratio: float) -> str:
  """Shape name from area / bounding-box area."""
  if fill_ratio >= SQUARE_MIN_FILL:
    return "square"
  if fill_ratio >= CIRCLE_MIN_FILL:
    return "circle"
  return "triangle"


def detect_objects(image: np.ndarray) -> list[DetectedObject]:
  """Objects of a square RGB image, in raster order of their first pixel."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[0] != image.shape[1]:
    raise ValueError(f"expected a square (S, S, 3) image, got shape {image.shape}")
  seg = segment(image)
  labels = _label_components(seg)
  flat = labels.ravel()
  ids, areas = np.unique(flat[flat >= 0], return_counts=True)
  min_area = MIN_AREA_FRACTION * min_object_area(image.shape[0])
  objects = []
  for label, area in zip(ids.tolist(), areas.tolist()):
    if area < min_area:  # specks and noise; checked before the per-component work
      continue
    ys, xs = np.nonzero(labels == label)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    fill = area / ((x1 - x0) * (y1 - y0))
    color = gen.COLORS[int(seg.flat[label])]  # the label is the flat index of a member pixel
    # Pixel centres, as the generator measures centroids when it places position examples.
    centroid = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
    objects.append(DetectedObject(classify_shape(fill), color, area, (x0, y0, x1, y1), centroid))
  return objects


# ----------------------------------------------------------------------------------------------
# Captions.

_SHAPE = "(" + "|".join(gen.SHAPES) + ")"
_COLOR = "(" + "|".join(gen.COLORS) + ")"
_COUNT = "(" + "|".join(gen.COUNT_WORDS.values()) + ")"
_RELATION = "(" + "|".join(gen.RELATIONS) + ")"
_TEMPLATES = {
    "single_object": re.compile(rf"a {_SHAPE}"),
    "two_object": re.compile(rf"a {_SHAPE} and a {_SHAPE}"),
    "counting": re.compile(rf"{_COUNT} {_SHAPE}s"),
    "colors": re.compile(rf"a {_COLOR} {_SHAPE}"),
    "position": re.compile(rf"a {_SHAPE} {_RELATION} a {_SHAPE}"),
    "color_attr": re.compile(rf"a {_COLOR} {_SHAPE} and a {_COLOR} {_SHAPE}"),
}
assert set(_TEMPLATES) == set(gen.CATEGORIES)


def _prompt_from_match(category: str, caption: str, g: tuple[str, ...]) -> Prompt:
  if category == "single_object":
    return Prompt(category, caption, shapes=(g[0],))
  if category == "two_object":
    return Prompt(category, caption, shapes=(g[0], g[1]))
  if category == "counting":
    return Prompt(category, caption, shapes=(g[1],), count=_NUMBER_OF_WORD[g[0]])
  if category == "colors":
    return Prompt(category, caption, shapes=(g[1],), colors=(g[0],))
  if category == "position":
    return Prompt(category, caption, shapes=(g[0], g[2]), relation=g[1])
  return Prompt(category, caption, shapes=(g[1], g[3]), colors=(g[0], g[2]))  # color_attr


def parse_caption(caption: str, category: str | None = None) -> Prompt:
  """Parses a caption of one of the generator's templates; infers the category when not given.

  The six templates are mutually exclusive, so the category is unambiguous. Two-object templates
  must name two different shapes, as the generator draws them (the relation of ``position``
  would be ill-defined otherwise). Raises ValueError on anything else.
  """
  if category is not None and category not in _TEMPLATES:
    raise ValueError(f"unknown category {category!r}; expected one of {gen.CATEGORIES}")
  text = caption.strip()
  candidates = [category] if category is not None else list(_TEMPLATES)
  for cat in candidates:
    match = _TEMPLATES[cat].fullmatch(text)
    if match is None:
      continue
    prompt = _prompt_from_match(cat, text, match.groups())
    if len(prompt.shapes) == 2 and prompt.shapes[0] == prompt.shapes[1]:
      raise ValueError(f"caption {caption!r} names the same shape twice; {cat} needs two shapes")
    return prompt
  where = f"the {category} template" if category else "any GenEval-Shapes template"
  raise ValueError(f"caption {caption!r} does not match {where}")


# ----------------------------------------------------------------------------------------------
# Verdicts.


def verdict(prompt: Prompt, objects: Sequence[DetectedObject], image_size: int) -> bool:
  """Whether the detected objects are exactly those the prompt names (see ``score_image``)."""
  shapes = sorted(o.shape for o in objects)
  cat = prompt.category
  if cat in ("single_object", "two_object"):
    return shapes == sorted(prompt.shapes)
  if cat == "counting":
    return shapes == [prompt.shapes[0]] * prompt.count
  if cat in ("colors", "color_attr"):
    return sorted((o.shape, o.color) for o in objects) == sorted(zip(prompt.shapes,
                                                                    prompt.colors))
  if cat == "position":
    if shapes != sorted(prompt.shapes):
      return False
    first = next(o for o in objects if o.shape == prompt.shapes[0])
    second = next(o for o in objects if o.shape == prompt.shapes[1])
    margin = POSITION_MARGIN_FRACTION * image_size
    return gen.relation_holds(prompt.relation, first.centroid, second.centroid, margin)
  raise ValueError(f"unknown category {cat!r}")


def score_image(image: np.ndarray, caption: str | Prompt, category: str | None = None) -> bool:
  """Whether ``image`` shows what ``caption`` says.

  The image must hold exactly the objects the caption names, nothing more:
    single_object: one object, of the named shape.
    two_object: two objects, one of each named shape.
    counting: N objects, all of the named shape.
    colors: one object, of the named shape and colour.
    position: two objects, one of each named shape, whose centroids satisfy the relation by at
      least 0.1 x image_size along its axis.
    color_attr: two objects, shape1 in color1 and shape2 in color2.
  GenEval lets two_object, counting, position and color_attr images hold other objects too; its
  detector misses and invents objects, ours does not, and with that allowance an image full of
  coloured blobs passes two-object prompts by chance.
  """
  prompt = caption if isinstance(caption, Prompt) else parse_caption(caption, category)
  image = np.asarray(image)
  return verdict(prompt, detect_objects(image), image.shape[0])


def score_batch(images, captions: Sequence[str], categories: Sequence[str] | None = None) -> dict:
  """Scores a batch; returns {"overall", "per_category", "counts"}.

  ``per_category`` maps every category to its accuracy, or to None when the batch holds no
  caption of it; ``counts`` gives the number of images per category (0 for absent ones). The
  overall score is the unweighted mean over the categories present, so a batch that lacks a
  category is not penalised for it (use a balanced set such as ``evaluation_prompts`` to report a
  GenEval-comparable number).
  """
  if len(images) != len(captions):
    raise ValueError(f"{len(images)} images but {len(captions)} captions")
  if categories is not None and len(categories) != len(captions):
    raise ValueError(f"{len(categories)} categories but {len(captions)} captions")
  if len(captions) == 0:
    raise ValueError("cannot score an empty batch")
  correct = collections.Counter()
  counts = collections.Counter()
  for i, (image, caption) in enumerate(zip(images, captions)):
    prompt = parse_caption(caption, None if categories is None else categories[i])
    counts[prompt.category] += 1
    correct[prompt.category] += int(score_image(image, prompt))
  per_category = {
      cat: (correct[cat] / counts[cat] if counts[cat] else None) for cat in gen.CATEGORIES
  }
  present = [acc for acc in per_category.values() if acc is not None]
  return {
      "overall": float(np.mean(present)),
      "per_category": per_category,
      "counts": {cat: counts[cat] for cat in gen.CATEGORIES},
  }


def evaluation_prompts(num_per_category: int = 100, seed: int = 0) -> list[Prompt]:
  """A standard, balanced prompt set: ``num_per_category`` generator captions per category.

  Category ``k``'s prompt ``i`` comes from the generator's example stream
  ``EVAL_PROMPT_STREAM + k`` at index ``i``, with the category forced, so the set is stable for a
  given seed and its prefixes are the smaller sets. Ordered by category, then index; captions may
  repeat, as there are only a few dozen distinct captions per category.
  """
  if num_per_category < 0:
    raise ValueError(f"num_per_category must be non-negative, got {num_per_category}")
  prompts = []
  for k, category in enumerate(gen.CATEGORIES):
    for i in range(num_per_category):
      rng = gen.example_rng(seed, i, stream=EVAL_PROMPT_STREAM + k)
      # Captions are drawn before placement, so they do not depend on the image size.
      example = gen.generate_example(rng, gen.MIN_IMAGE_SIZE * 2, category)
      prompts.append(parse_caption(example.caption, category))
  return prompts

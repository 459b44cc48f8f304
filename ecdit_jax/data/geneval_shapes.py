"""GenEval-Shapes: procedurally drawn coloured shapes with compositional captions.

The built-in, download-free text-to-image dataset, described in docs/GENEVAL_SHAPES.md.
Every image is a black square canvas with one to four filled circles, squares or isosceles
triangles in a six-colour palette, drawn without anti-aliasing so that a deterministic detector
can recover every object exactly. Each example belongs to one of the six GenEval categories and
carries the caption of that category's template.

Determinism: example ``i`` of a stream depends only on ``(seed, i)`` (and the stream number), so
any shard of the dataset can be generated independently and byte-identically.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SHAPES = ("circle", "square", "triangle")
PALETTE = {
  "red": (230, 40, 40),
  "green": (40, 200, 60),
  "blue": (50, 90, 240),
  "yellow": (240, 220, 40),
  "purple": (170, 60, 220),
  "cyan": (40, 210, 220),
}
COLORS = tuple(PALETTE)
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("to the left of", "to the right of", "above", "below")

MIN_SIDE_FRACTION = 0.22
MAX_SIDE_FRACTION = 0.34
MIN_GAP_PIXELS = 2
POSITION_MARGIN_FRACTION = 0.15
MIN_IMAGE_SIZE = 16

# Rejection-sampling budget: tries to place one object, then restarts of a whole example.
_PLACEMENT_TRIES = 200
_EXAMPLE_RESTARTS = 100

# The disc's radius sits a tenth of a pixel inside its box: with pure pixel-centre sampling the
# fill ratio of small odd-sized discs overshoots pi/4 (0.85 at 9 px), too near the scorer's 0.88
# square threshold. The box is still filled edge to edge (checked in the tests).
_CIRCLE_RADIUS_INSET = 0.1


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  """One drawn object; ``bbox`` is (x0, y0, x1, y1) in pixels with x1/y1 exclusive."""

  shape: str
  color: str
  bbox: tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True)
class Example:
  """One image with its caption, GenEval category and the objects drawn in caption order."""

  image: np.ndarray  # uint8 (S, S, 3)
  caption: str
  category: str
  objects: tuple[ShapeObject, ...]


def _round_half_up(value: float) -> int:
  # Python's round() rounds halves to even; half-up keeps min/max side consistent with sampling.
  return int(math.floor(value + 0.5))


def min_object_side(image_size: int) -> int:
  """Smallest bounding-box side (pixels) that the generator can draw at this image size."""
  return _round_half_up(MIN_SIDE_FRACTION * image_size)


def max_object_side(image_size: int) -> int:
  """Largest bounding-box side (pixels) that the generator can draw at this image size."""
  return _round_half_up(MAX_SIDE_FRACTION * image_size)


def shape_mask(shape: str, side: int) -> np.ndarray:
  """Boolean (side, side) mask of a shape filling a square box, by pixel-centre tests."""
  if side < 1:
    raise ValueError(f"side must be positive, got {side}")
  centres = np.arange(side) + 0.5  # pixel centres relative to the box's top-left corner
  offsets = centres - side / 2.0  # signed distance of pixel centres from the box's middle
  if shape == "square":
    return np.ones((side, side), dtype=bool)
  if shape == "circle":
    radius = side / 2.0 - _CIRCLE_RADIUS_INSET
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2
  if shape == "triangle":
    # Apex at the top middle, base along the bottom edge, height == base: the half-width at
    # depth d below the apex is d / 2. The apex row keeps at least the pixel(s) straddling the
    # centre line, otherwise even sides would lose their top row and the height would shrink.
    half_width = np.maximum(centres / 2.0, 0.5)
    return np.abs(offsets)[None, :] <= half_width[:, None]
  raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw_shape(canvas: np.ndarray, shape: str, color_rgb, bbox) -> None:
  """Paints a filled shape of exactly ``color_rgb`` into ``canvas`` (H, W, 3) in place."""
  x0, y0, x1, y1 = (int(v) for v in bbox)
  side = x1 - x0
  if side != y1 - y0:
    raise ValueError(f"bbox must be square, got {bbox}")
  if x0 < 0 or y0 < 0 or x1 > canvas.shape[1] or y1 > canvas.shape[0]:
    raise ValueError(f"bbox {bbox} lies outside the canvas {canvas.shape[:2]}")
  mask = shape_mask(shape, side)
  canvas[y0:y1, x0:x1][mask] = np.asarray(color_rgb, dtype=canvas.dtype)


def object_centroid(obj: ShapeObject) -> tuple[float, float]:
  """(x, y) centroid of the drawn pixels (pixel centres), as a detector would measure it."""
  x0, y0, x1, _ = obj.bbox
  ys, xs = np.nonzero(shape_mask(obj.shape, x1 - x0))
  return float(x0 + xs.mean() + 0.5), float(y0 + ys.mean() + 0.5)


def _boxes_separated(a, b, gap: int) -> bool:
  """True if two boxes are at least ``gap`` empty pixels apart along x or along y."""
  return a[0] >= b[2] + gap or b[0] >= a[2] + gap or a[1] >= b[3] + gap or b[1] >= a[3] + gap


def _sample_side(rng: np.random.Generator, image_size: int) -> int:
  low, high = MIN_SIDE_FRACTION * image_size, MAX_SIDE_FRACTION * image_size
  return _round_half_up(rng.uniform(low, high))


def _place_objects(rng, image_size, specs) -> tuple[ShapeObject, ...] | None:
  """Places (shape, colour) specs at random non-overlapping spots; None if a spec won't fit."""
  placed: list[ShapeObject] = []
  for shape, color in specs:
    side = _sample_side(rng, image_size)
    for _ in range(_PLACEMENT_TRIES):
      x0 = int(rng.integers(0, image_size - side + 1))
      y0 = int(rng.integers(0, image_size - side + 1))
      box = (x0, y0, x0 + side, y0 + side)
      if all(_boxes_separated(box, other.bbox, MIN_GAP_PIXELS) for other in placed):
        placed.append(ShapeObject(shape, color, box))
        break
    else:
      return None
  return tuple(placed)


def relation_holds(relation: str, first: tuple[float, float], second: tuple[float, float],
                   margin: float) -> bool:
  """Whether the centroid ``first`` (x, y) is ``relation`` the centroid ``second``, by at least
  ``margin`` pixels along that axis. The generator places objects by it; the scorer judges."""
  (ax, ay), (bx, by) = first, second
  if relation == "to the left of":
    return bx - ax >= margin
  if relation == "to the right of":
    return ax - bx >= margin
  if relation == "above":  # image y grows downwards
    return by - ay >= margin
  if relation == "below":
    return ay - by >= margin
  raise ValueError(f"unknown relation {relation!r}")


def _choice(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def _two_distinct(rng: np.random.Generator, options) -> tuple:
  first, second = rng.choice(len(options), size=2, replace=False)
  return options[int(first)], options[int(second)]


def _plan(rng: np.random.Generator, category: str):
  """Draws the caption content: (caption, [(shape, colour), ...], position relation or None)."""
  if category == "single_object":
    shape = _choice(rng, SHAPES)
    return f"a {shape}", [(shape, _choice(rng, COLORS))], None
  if category == "two_object":
    s1, s2 = _two_distinct(rng, SHAPES)
    return f"a {s1} and a {s2}", [(s1, _choice(rng, COLORS)), (s2, _choice(rng, COLORS))], None
  if category == "counting":
    count = int(rng.integers(2, 5))
    shape = _choice(rng, SHAPES)
    specs = [(shape, _choice(rng, COLORS)) for _ in range(count)]
    return f"{COUNT_WORDS[count]} {shape}s", specs, None
  if category == "colors":
    shape, color = _choice(rng, SHAPES), _choice(rng, COLORS)
    return f"a {color} {shape}", [(shape, color)], None
  if category == "position":
    s1, s2 = _two_distinct(rng, SHAPES)
    relation = _choice(rng, RELATIONS)
    specs = [(s1, _choice(rng, COLORS)), (s2, _choice(rng, COLORS))]
    return f"a {s1} {relation} a {s2}", specs, relation
  if category == "color_attr":
    s1, s2 = _two_distinct(rng, SHAPES)
    c1, c2 = _two_distinct(rng, COLORS)
    return f"a {c1} {s1} and a {c2} {s2}", [(s1, c1), (s2, c2)], None
  raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def render(objects, image_size: int) -> np.ndarray:
  """Draws objects on a black (S, S, 3) uint8 canvas."""
  canvas = np.zeros((image_size, image_size, 3), dtype=np.uint8)
  for obj in objects:
    draw_shape(canvas, obj.shape, PALETTE[obj.color], obj.bbox)
  return canvas


def generate_example(
  rng: np.random.Generator, image_size: int = 32, category: str | None = None
) -> Example:
  """Draws one example (category uniform unless given) using only ``rng`` for randomness."""
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
  if category is None:
    category = _choice(rng, CATEGORIES)
  elif category not in CATEGORIES:
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
  caption, specs, relation = _plan(rng, category)
  margin = POSITION_MARGIN_FRACTION * image_size
  for _ in range(_EXAMPLE_RESTARTS):
    objects = _place_objects(rng, image_size, specs)
    if objects is None:
      continue
    if relation is not None and not relation_holds(relation, object_centroid(objects[0]),
                                                   object_centroid(objects[1]), margin):
      continue
    return Example(render(objects, image_size), caption, category, objects)
  raise RuntimeError(
    f"could not place {caption!r} on a {image_size}px canvas in {_EXAMPLE_RESTARTS} restarts"
  )


def example_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
  """The generator for example ``index``; streams (e.g. train=0, test=1) never share examples."""
  if seed < 0 or index < 0 or stream < 0:
    raise ValueError("seed, index and stream must be non-negative")
  entropy = [seed, index] if stream == 0 else [seed, index, stream]
  return np.random.default_rng(entropy)


def generate_example_at(seed: int, index: int, image_size: int = 32, stream: int = 0) -> Example:
  """Example ``index`` of the dataset for ``seed``, computed without generating the others."""
  return generate_example(example_rng(seed, index, stream), image_size)


def generate_examples(
  seed: int, num_examples: int, image_size: int = 32, *, stream: int = 0, start: int = 0
) -> Iterator[Example]:
  """Yields examples ``start .. start + num_examples - 1`` of the dataset for ``seed``."""
  for index in range(start, start + num_examples):
    yield generate_example_at(seed, index, image_size, stream)

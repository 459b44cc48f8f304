"""The GenEval-Shapes generator against its spec: determinism, drawing, placement and captions."""

import collections
import itertools
import re

import numpy as np
import pytest
from scipy import ndimage

from ecdit_jax.data import geneval_shapes as gs

NUM_PROPERTY_EXAMPLES = {32: 600, 64: 200}
COUNT_NUMBERS = {"two": 2, "three": 3, "four": 4}
SHAPE = r"(circle|square|triangle)"
COLOR = r"(red|green|blue|yellow|purple|cyan)"
TEMPLATES = {
  "single_object": rf"a {SHAPE}",
  "two_object": rf"a {SHAPE} and a {SHAPE}",
  "counting": rf"(two|three|four) {SHAPE}s",
  "colors": rf"a {COLOR} {SHAPE}",
  "position": rf"a {SHAPE} (to the left of|to the right of|above|below) a {SHAPE}",
  "color_attr": rf"a {COLOR} {SHAPE} and a {COLOR} {SHAPE}",
}


@pytest.fixture(scope="module", params=[32, 64])
def examples(request):
  size = request.param
  return size, list(
    gs.generate_examples(seed=11, num_examples=NUM_PROPERTY_EXAMPLES[size], image_size=size)
  )


def _side_bounds(size):
  # Independent of the module: sides are 0.22..0.34 x size, rounded to whole pixels.
  return int(np.floor(0.22 * size + 0.5)), int(np.floor(0.34 * size + 0.5))


def _object_pixels(image, obj):
  """Boolean mask (full canvas) of the pixels of the object's colour inside its bbox."""
  x0, y0, x1, y1 = obj.bbox
  mask = np.zeros(image.shape[:2], dtype=bool)
  mask[y0:y1, x0:x1] = np.all(image[y0:y1, x0:x1] == gs.PALETTE[obj.color], axis=-1)
  return mask


def _centroid(mask):
  ys, xs = np.nonzero(mask)
  return xs.mean() + 0.5, ys.mean() + 0.5


def test_same_seed_gives_identical_bytes_and_different_seed_differs():
  first = list(gs.generate_examples(seed=5, num_examples=40))
  second = list(gs.generate_examples(seed=5, num_examples=40))
  other = list(gs.generate_examples(seed=6, num_examples=40))
  assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(first, second))
  assert [(a.caption, a.objects) for a in first] == [(b.caption, b.objects) for b in second]
  assert sum(a.image.tobytes() != c.image.tobytes() for a, c in zip(first, other)) >= 35
  assert [a.caption for a in first] != [c.caption for c in other]


def test_examples_are_independent_of_their_neighbours():
  sequential = list(gs.generate_examples(seed=9, num_examples=12))
  for index in (0, 7, 11):
    alone = gs.generate_example_at(9, index)
    assert alone.image.tobytes() == sequential[index].image.tobytes()
    assert alone.caption == sequential[index].caption
  shard = list(gs.generate_examples(seed=9, num_examples=4, start=8))
  assert [e.caption for e in shard] == [e.caption for e in sequential[8:]]
  test_stream = list(gs.generate_examples(seed=9, num_examples=12, stream=1))
  assert [e.image.tobytes() for e in test_stream] != [e.image.tobytes() for e in sequential]


def test_images_hold_only_black_and_palette_colours(examples):
  size, items = examples
  allowed = {(0, 0, 0)} | set(gs.PALETTE.values())
  for example in items:
    assert example.image.dtype == np.uint8 and example.image.shape == (size, size, 3)
    colours = {tuple(c) for c in np.unique(example.image.reshape(-1, 3), axis=0)}
    assert colours <= allowed
    # Every non-black pixel belongs to an object, in that object's colour.
    covered = np.zeros((size, size), dtype=bool)
    for obj in example.objects:
      covered |= _object_pixels(example.image, obj)
    assert np.array_equal(covered, example.image.any(axis=-1))


def test_objects_inside_canvas_sized_and_separated(examples):
  size, items = examples
  low, high = _side_bounds(size)
  assert gs.min_object_side(size) == low
  sides = collections.Counter()
  for example in items:
    for obj in example.objects:
      x0, y0, x1, y1 = obj.bbox
      assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
      assert x1 - x0 == y1 - y0 and low <= x1 - x0 <= high
      sides[x1 - x0] += 1
    for a, b in itertools.combinations(example.objects, 2):
      (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.bbox, b.bbox
      gap_x = max(bx0 - ax1, ax0 - bx1)  # empty columns between the boxes (<0: overlap)
      gap_y = max(by0 - ay1, ay0 - by1)
      assert max(gap_x, gap_y) >= 2, (example.caption, a, b)
  assert set(sides) == set(range(low, high + 1))  # the whole size range is used


def test_captions_follow_templates_and_match_drawn_objects(examples):
  size, items = examples
  for example in items:
    match = re.fullmatch(TEMPLATES[example.category], example.caption)
    assert match, (example.category, example.caption)
    groups, objects = match.groups(), example.objects
    shapes = [o.shape for o in objects]
    colors = [o.color for o in objects]
    if example.category == "single_object":
      assert shapes == [groups[0]]
    elif example.category == "two_object":
      assert shapes == [groups[0], groups[1]] and groups[0] != groups[1]
    elif example.category == "counting":
      assert shapes == [groups[1]] * COUNT_NUMBERS[groups[0]]
    elif example.category == "colors":
      assert (colors, shapes) == ([groups[0]], [groups[1]])
    elif example.category == "position":
      assert shapes == [groups[0], groups[2]] and groups[0] != groups[2]
    elif example.category == "color_attr":
      assert colors == [groups[0], groups[2]] and shapes == [groups[1], groups[3]]
      assert groups[0] != groups[2] and groups[1] != groups[3]


def test_position_relation_holds_with_margin(examples):
  size, items = examples
  checked = 0
  for example in (e for e in items if e.category == "position"):
    relation = re.fullmatch(TEMPLATES["position"], example.caption).group(2)
    (ax, ay), (bx, by) = (_centroid(_object_pixels(example.image, o)) for o in example.objects)
    delta = {
      "to the left of": bx - ax,
      "to the right of": ax - bx,
      "above": by - ay,
      "below": ay - by,
    }
    assert delta[relation] >= 0.15 * size, (example.caption, example.objects)
    checked += 1
  assert checked >= 20


def test_categories_are_roughly_uniform():
  counts = collections.Counter(e.category for e in gs.generate_examples(seed=2, num_examples=3000))
  assert set(counts) == set(gs.CATEGORIES)
  assert all(abs(n - 500) < 100 for n in counts.values()), counts  # +-100 is about 5 sigma


def test_fill_ratios_and_connectivity_of_drawn_objects(examples):
  size, items = examples
  smallest_area = min(gs.shape_mask(s, gs.min_object_side(size)).sum() for s in gs.SHAPES)
  for example in items:
    for obj in example.objects:
      mask = _object_pixels(example.image, obj)
      labels, count = ndimage.label(mask)  # default structure: 4-connectivity
      assert count == 1, obj
      ys, xs = np.nonzero(mask)
      box_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
      x0, y0, x1, y1 = obj.bbox
      assert box_area == (x1 - x0) * (y1 - y0)  # the drawn extent is the declared bbox
      ratio = mask.sum() / box_area
      if obj.shape == "square":
        assert ratio >= 0.88
      elif obj.shape == "circle":
        assert 0.68 <= ratio <= 0.84, (obj, ratio)  # well inside the 0.64..0.88 band
      else:
        assert ratio <= 0.58, (obj, ratio)
      assert mask.sum() >= 0.35 * smallest_area


@pytest.mark.parametrize("size", [32, 64])
def test_every_drawable_size_rasterises_cleanly(size):
  for shape, side in itertools.product(
    gs.SHAPES, range(gs.min_object_side(size), gs.max_object_side(size) + 1)
  ):
    mask = gs.shape_mask(shape, side)
    _, count = ndimage.label(mask)
    assert count == 1, (shape, side)
    assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
    assert np.array_equal(mask, mask[:, ::-1])  # left-right symmetric: centroid x = box centre
  triangle = gs.shape_mask("triangle", 11)
  assert triangle[-1].all() and triangle[0].sum() == 1  # base at the bottom, apex up


def test_draw_shape_paints_exact_colour_in_place():
  canvas = np.zeros((32, 32, 3), dtype=np.uint8)
  gs.draw_shape(canvas, "circle", gs.PALETTE["cyan"], (3, 4, 12, 13))
  painted = canvas.any(axis=-1)
  assert np.array_equal(painted[4:13, 3:12], gs.shape_mask("circle", 9))
  assert painted.sum() == gs.shape_mask("circle", 9).sum()
  assert np.all(canvas[painted] == gs.PALETTE["cyan"])
  with pytest.raises(ValueError):
    gs.draw_shape(canvas, "circle", gs.PALETTE["red"], (28, 28, 36, 36))


def test_requested_category_and_invalid_arguments():
  rng = np.random.default_rng(0)
  for category in gs.CATEGORIES:
    assert gs.generate_example(rng, 32, category).category == category
  with pytest.raises(ValueError):
    gs.generate_example(rng, 32, "counting_sheep")
  with pytest.raises(ValueError):
    gs.generate_example(rng, 8)

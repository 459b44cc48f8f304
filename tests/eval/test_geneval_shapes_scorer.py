"""The GenEval-Shapes scorer: dataset accuracy, noise floor, detector edge cases, captions."""

import itertools

import numpy as np
import pytest

from ecdit_jax.data import geneval_shapes as gen
from ecdit_jax.eval import geneval_shapes as sc

S = 32  # canvas of the hand-made cases; min side 7, smallest drawable area 25 (triangle)
RED = gen.PALETTE["red"]
BLUE = gen.PALETTE["blue"]


def _canvas(size=S):
  return np.zeros((size, size, 3), dtype=np.uint8)


def _draw(canvas, shape, rgb, bbox):
  gen.draw_shape(canvas, shape, rgb, bbox)
  return canvas


def _dataset(size, per_category, seed):
  examples = []
  for k, category in enumerate(gen.CATEGORIES):
    rng = np.random.default_rng([seed, size, k])
    examples += [gen.generate_example(rng, size, category) for _ in range(per_category)]
  return examples


@pytest.fixture(scope="module", params=[32, 64])
def dataset(request):
  return request.param, _dataset(request.param, 100, seed=3)


# ---------------------------------------------------------------------------------------------
# The dataset's own images and the noise floor.


def test_dataset_accuracy_every_category(dataset):
  _, examples = dataset
  images, captions = [e.image for e in examples], [e.caption for e in examples]
  for categories in (None, [e.category for e in examples]):
    result = sc.score_batch(images, captions, categories)
    assert result["counts"] == {c: 100 for c in gen.CATEGORIES}
    for category, accuracy in result["per_category"].items():
      assert accuracy >= 0.99, (category, accuracy)
    assert result["overall"] >= 0.99


def test_detector_recovers_generated_objects(dataset):
  size, examples = dataset
  for example in examples[::3]:
    detected = sc.detect_objects(example.image)
    assert sorted((d.shape, d.color, d.bbox) for d in detected) == sorted(
        (o.shape, o.color, o.bbox) for o in example.objects)
    for obj in example.objects:
      match = next(d for d in detected if d.bbox == obj.bbox)
      x0, y0, x1, y1 = obj.bbox
      assert match.area == int(gen.shape_mask(obj.shape, x1 - x0).sum())
      np.testing.assert_allclose(match.centroid, gen.object_centroid(obj), atol=1e-9)


@pytest.mark.parametrize("size", [32, 64])
def test_uniform_noise_scores_near_zero(size):
  captions = [e.caption for e in _dataset(size, 50, seed=4)]
  noise = np.random.default_rng(size).integers(0, 256, (len(captions), size, size, 3), np.uint8)
  result = sc.score_batch(noise, captions)
  for category, accuracy in result["per_category"].items():
    assert accuracy <= 0.05, (category, accuracy)


@pytest.mark.parametrize("size", [32, 64])
def test_blank_images_score_exactly_zero(size):
  captions = [e.caption for e in _dataset(size, 30, seed=5)]
  result = sc.score_batch(np.zeros((len(captions), size, size, 3), np.uint8), captions)
  assert result["per_category"] == {c: 0.0 for c in gen.CATEGORIES}
  assert result["overall"] == 0.0


# ---------------------------------------------------------------------------------------------
# Segmentation and components.


def test_same_colour_objects_touching_along_an_edge_merge():
  touching = _draw(_draw(_canvas(), "square", RED, (4, 4, 12, 12)), "square", RED, (12, 4, 20, 12))
  detected = sc.detect_objects(touching)
  assert [(d.bbox, d.area) for d in detected] == [((4, 4, 20, 12), 128)]
  assert not sc.score_image(touching, "two squares")
  # The same pair one pixel apart, or touching in different colours, stays two objects.
  apart = _draw(_draw(_canvas(), "square", RED, (4, 4, 12, 12)), "square", RED, (13, 4, 21, 12))
  assert sc.score_image(apart, "two squares")
  mixed = _draw(_draw(_canvas(), "square", RED, (4, 4, 12, 12)), "square", BLUE, (12, 4, 20, 12))
  assert sc.score_image(mixed, "two squares")


def test_diagonal_contact_does_not_merge():
  image = _draw(_draw(_canvas(), "square", RED, (4, 4, 12, 12)), "square", RED, (12, 12, 20, 20))
  assert len(sc.detect_objects(image)) == 2
  assert sc.score_image(image, "two squares")


@pytest.mark.parametrize("rgb", [(128, 128, 128), (100, 30, 30), (149, 40, 40), (255, 255, 255)])
def test_off_palette_colours_are_background(rgb):
  image = _draw(_canvas(), "square", rgb, (4, 4, 14, 14))
  assert (sc.segment(image) == -1).all()
  assert sc.detect_objects(image) == []
  assert not sc.score_image(image, "a square")


@pytest.mark.parametrize("rgb", [(151, 40, 40), (200, 70, 60), (255, 10, 70)])
def test_colour_within_distance_80_takes_the_palette_colour(rgb):
  assert np.linalg.norm(np.subtract(rgb, RED)) < 80
  image = _draw(_canvas(), "square", rgb, (4, 4, 14, 14))
  assert (sc.segment(image)[4:14, 4:14] == gen.COLORS.index("red")).all()
  assert sc.score_image(image, "a red square")


def test_brightest_channel_must_exceed_100(monkeypatch):
  # Every real palette entry is bright, so distance alone already rejects dim pixels; a palette
  # with dim entries isolates the brightness rule.
  dim_palette = np.array([[100, 20, 20], [101, 20, 20], [0, 0, 0], [0, 0, 0], [0, 0, 0],
                          [0, 0, 0]])
  monkeypatch.setattr(sc, "_PALETTE_RGB", dim_palette)
  image = _canvas()
  image[0, 0] = (100, 20, 20)  # exact palette colour, brightest channel 100: background
  image[0, 5] = (101, 20, 20)  # brightest channel 101: coloured
  seg = sc.segment(image)
  assert seg[0, 0] == -1 and seg[0, 5] == 1


def test_area_threshold_from_the_generators_smallest_object():
  for size in (16, 32, 64):
    side = gen.min_object_side(size)
    assert sc.min_object_area(size) == min(int(gen.shape_mask(s, side).sum()) for s in gen.SHAPES)
  threshold = 0.35 * sc.min_object_area(S)  # 8.75 at 32 px
  above = _canvas()
  above[20:23, 20:23] = BLUE  # 3x3 = 9 pixels: kept
  assert [d.area for d in sc.detect_objects(above)] == [9]
  below = _canvas()
  below[20:22, 20:24] = BLUE  # 2x4 = 8 pixels: dropped
  assert 8 < threshold <= 9 and sc.detect_objects(below) == []


def test_tiny_speck_is_ignored():
  image = _draw(_canvas(), "square", RED, (4, 4, 12, 12))
  image[25:27, 25:27] = BLUE  # a 2x2 speck of another colour
  assert sc.score_image(image, "a square")
  assert sc.score_image(image, "a red square")
  image[25:29, 25:29] = BLUE  # grown to 16 px, a real (second) object
  assert not sc.score_image(image, "a square")


def test_shape_thresholds():
  assert sc.classify_shape(1.0) == "square" and sc.classify_shape(0.88) == "square"
  assert sc.classify_shape(0.8799) == "circle" and sc.classify_shape(0.64) == "circle"
  assert sc.classify_shape(0.6399) == "triangle"
  for shape in gen.SHAPES:
    image = _draw(_canvas(), shape, RED, (5, 5, 14, 14))
    assert [d.shape for d in sc.detect_objects(image)] == [shape]


# ---------------------------------------------------------------------------------------------
# Verdicts.


def _circle_and_square(circle_box, square_box):
  return _draw(_draw(_canvas(), "circle", RED, circle_box), "square", BLUE, square_box)


def test_position_needs_the_margin():
  # Circle centroid x = 5.5; square centroid x = x0 + 3.5; margin = 0.1 * 32 = 3.2.
  close = _circle_and_square((2, 2, 9, 9), (5, 20, 12, 27))  # 3.0 apart
  assert not sc.score_image(close, "a circle to the left of a square")
  far = _circle_and_square((2, 2, 9, 9), (6, 20, 13, 27))  # 4.0 apart
  assert sc.score_image(far, "a circle to the left of a square")
  assert sc.score_image(far, "a square to the right of a circle")
  assert not sc.score_image(far, "a circle to the right of a square")


def test_above_means_smaller_y():
  image = _circle_and_square((12, 2, 19, 9), (12, 20, 19, 27))  # circle at the top
  assert sc.score_image(image, "a circle above a square")
  assert sc.score_image(image, "a square below a circle")
  assert not sc.score_image(image, "a circle below a square")
  assert not sc.score_image(image, "a square above a circle")


def test_position_needs_one_object_of_each_shape():
  image = _circle_and_square((12, 2, 19, 9), (12, 20, 19, 27))
  assert not sc.score_image(image, "a circle above a triangle")
  _draw(image, "circle", RED, (22, 22, 29, 29))  # a second circle, below the square
  assert not sc.score_image(image, "a circle above a square")


def test_wrong_colour_fails_colors():
  image = _draw(_canvas(), "square", RED, (4, 4, 14, 14))
  assert sc.score_image(image, "a red square")
  assert not sc.score_image(image, "a blue square")
  assert not sc.score_image(image, "a red circle")
  _draw(image, "circle", BLUE, (18, 18, 27, 27))  # colors wants exactly one object
  assert not sc.score_image(image, "a red square")
  assert sc.score_image(image, "a red square and a blue circle")
  assert not sc.score_image(image, "a blue square and a red circle")


def test_counting_and_object_verdicts():
  image = _canvas()
  for x0 in (2, 12, 22):
    _draw(image, "triangle", RED, (x0, 2, x0 + 8, 10))
  assert sc.score_image(image, "three triangles")
  assert not sc.score_image(image, "two triangles")
  assert not sc.score_image(image, "four triangles")
  _draw(image, "square", BLUE, (2, 20, 10, 28))  # the image must hold only what is named
  assert not sc.score_image(image, "three triangles")
  assert not sc.score_image(image, "a triangle and a square")
  two = _draw(_draw(_canvas(), "triangle", RED, (2, 2, 10, 10)), "square", BLUE,
              (2, 20, 10, 28))
  assert sc.score_image(two, "a triangle and a square")
  assert sc.score_image(two, "a red triangle and a blue square")
  assert not sc.score_image(two, "a blue triangle and a red square")
  assert not sc.score_image(two, "a triangle and a circle")
  assert not sc.score_image(two, "a triangle")  # single_object allows no other object


@pytest.mark.parametrize("size", [32, 64])
def test_images_of_coloured_blocks_score_near_zero(size):
  """Random palette-coloured 8x8 blocks: every block a 'square', many objects an image."""
  captions = [e.caption for e in _dataset(size, 60, seed=6)]
  rng = np.random.default_rng(size + 1)
  palette = np.array([gen.PALETTE[c] for c in gen.COLORS] + [(0, 0, 0)], np.uint8)
  blocks = palette[rng.integers(0, len(palette), (len(captions), size // 8, size // 8))]
  images = blocks.repeat(8, axis=1).repeat(8, axis=2)
  result = sc.score_batch(images, captions)
  for category, accuracy in result["per_category"].items():
    assert accuracy <= 0.05, (category, accuracy)


# ---------------------------------------------------------------------------------------------
# Captions, batches and the prompt set.


def _all_captions():
  """Every caption the generator's templates can produce, with its category."""
  counts = gen.COUNT_WORDS.values()
  pairs = [(a, b) for a, b in itertools.permutations(gen.SHAPES, 2)]
  yield from (("single_object", f"a {s}") for s in gen.SHAPES)
  yield from (("two_object", f"a {a} and a {b}") for a, b in pairs)
  yield from (("counting", f"{n} {s}s") for n in counts for s in gen.SHAPES)
  yield from (("colors", f"a {c} {s}") for c in gen.COLORS for s in gen.SHAPES)
  yield from (("position", f"a {a} {r} a {b}") for a, b in pairs for r in gen.RELATIONS)
  yield from (("color_attr", f"a {c} {a} and a {d} {b}") for a, b in pairs
              for c, d in itertools.permutations(gen.COLORS, 2))


def _render_caption(p):
  """The generator's templates applied to a parsed prompt."""
  if p.category == "counting":
    return f"{gen.COUNT_WORDS[p.count]} {p.shapes[0]}s"
  if p.category == "position":
    return f"a {p.shapes[0]} {p.relation} a {p.shapes[1]}"
  colors = p.colors or ("",) * len(p.shapes)
  return " and ".join(f"a {c} {s}".replace("  ", " ") for c, s in zip(colors, p.shapes))


def test_parse_caption_round_trip_on_every_template():
  seen = set()
  for category, caption in _all_captions():
    for given in (None, category):
      prompt = sc.parse_caption(caption, given)
      assert prompt.category == category and prompt.caption == caption
      assert _render_caption(prompt) == caption
    seen.add(category)
  assert seen == set(gen.CATEGORIES)
  assert sc.parse_caption("four circles").count == 4
  assert sc.parse_caption("a square below a circle").relation == "below"
  assert sc.parse_caption("a cyan circle and a red square").colors == ("cyan", "red")


@pytest.mark.parametrize(
    "caption, category",
    [("a hexagon", None), ("five circles", None), ("a circle and a circle", None),
     ("a square above a square", None), ("a pink square", None), ("", None), ("circle", None),
     ("a circle", "colors"), ("two squares", "single_object"), ("a circle", "no_such")])
def test_bad_captions_raise(caption, category):
  with pytest.raises(ValueError):
    sc.parse_caption(caption, category)


def test_score_batch_reports_absent_categories_as_none():
  examples = _dataset(32, 4, seed=6)[:8]  # single_object (4) and two_object (4) only
  images = [e.image for e in examples]
  images[0] = _canvas()  # one single_object miss
  result = sc.score_batch(images, [e.caption for e in examples])
  assert result["per_category"]["single_object"] == 0.75
  assert result["per_category"]["two_object"] == 1.0
  assert all(result["per_category"][c] is None for c in gen.CATEGORIES[2:])
  assert result["counts"] == {c: (4 if c in gen.CATEGORIES[:2] else 0) for c in gen.CATEGORIES}
  assert result["overall"] == pytest.approx(0.875)
  with pytest.raises(ValueError):
    sc.score_batch(images, [e.caption for e in examples][:-1])


def test_evaluation_prompts_deterministic_and_balanced():
  prompts = sc.evaluation_prompts(20, seed=0)
  assert prompts == sc.evaluation_prompts(20, seed=0)
  assert prompts != sc.evaluation_prompts(20, seed=1)
  assert len(prompts) == 20 * len(gen.CATEGORIES)
  for k, category in enumerate(gen.CATEGORIES):
    block = prompts[20 * k:20 * (k + 1)]
    assert all(p.category == category for p in block)
    assert all(sc.parse_caption(p.caption) == p for p in block)
    assert len({p.caption for p in block}) > 1  # drawn at random, not one repeated caption
  small = sc.evaluation_prompts(5, seed=0)
  assert small == [p for i, p in enumerate(prompts) if i % 20 < 5]

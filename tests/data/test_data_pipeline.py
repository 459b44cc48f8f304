"""The grain pipeline: batch layout, determinism, process sharding, resumption and bad records."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from ecdit_jax.data import geneval_shapes as gs
from ecdit_jax.data import geneval_shapes_tfds as gst
from ecdit_jax.data import pipeline
from ecdit_jax.data import tokenizer as tk

SIZE, MAX_LEN = 16, 12
WORDS = ("a circle", "two squares", "a red triangle", "a blue circle above a square")


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _indexed_image(index):
  """A 16x16 image whose pixels spell out ``index`` so a batch row can be traced to its record."""
  image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
  image[..., 0] = index % 256
  image[..., 1] = index // 256
  return image


class IndexedSource:
  """In-memory random-access source: record i has an index-coded image and caption WORDS[i % 4]."""

  def __init__(self, size, encode_every=3):
    self._size, self._encode_every = size, encode_every

  def __len__(self):
    return self._size

  def __getitem__(self, index):
    image = _indexed_image(index)
    # Mix raw arrays and PNG bytes: both forms occur in real sources.
    image = _png(image) if index % self._encode_every == 0 else image
    return {"image": image, "caption": WORDS[index % len(WORDS)].encode()}


class PlantedBadSource:
  """Good records (images 0..5) interleaved with one of each kind of bad record."""

  def __init__(self):
    def good(i):
      return {"image": _indexed_image(i), "caption": WORDS[i % 4]}

    truncated_png = _png(_indexed_image(99))[:40]
    self.records = [
      good(0),
      {"image": b"definitely not a png", "caption": "a circle"},  # undecodable
      good(1),
      good(2),
      {"image": _indexed_image(98), "caption": ""},  # empty caption
      {"image": _indexed_image(97), "caption": "   \n"},  # whitespace caption
      good(3),
      {"image": np.zeros((8, 8, 3), np.uint8), "caption": "a circle"},  # wrong size
      {"image": np.zeros((SIZE, SIZE), np.uint8), "caption": "a circle"},  # no channels
      {"image": truncated_png, "caption": "a circle"},  # truncated encoding
      "unreadable",  # __getitem__ raises
      {"caption": "a circle"},  # missing image
      good(4),
      good(5),
    ]

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    record = self.records[index]
    if isinstance(record, str):
      raise OSError("storage failure")
    return record


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  captions = list(WORDS) + [e.caption for e in gs.generate_examples(3, 300)]
  return tk.train_tokenizer(captions, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=100)


def _iterator(source, tokenizer, **overrides):
  kwargs = dict(tokenizer=tokenizer, batch_size=4, image_size=SIZE, max_text_len=MAX_LEN, seed=7)
  kwargs.update(overrides)
  return pipeline.make_dataset_iterator(source, **kwargs)


def _record_ids(batch):
  """Record index of each batch row, read back from the index-coded pixels."""
  pixels = np.rint((batch["image"][:, 0, 0, :2] + 1.0) * 127.5).astype(int)
  return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_batch_layout_dtypes_ranges_and_pairing(tokenizer):
  batch = next(_iterator(IndexedSource(40), tokenizer))
  assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
  assert batch["tokens"].shape == (4, MAX_LEN) and batch["tokens"].dtype == np.int32
  assert batch["num_skipped"] == 0 and batch["num_skipped"].dtype == np.int32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  for record, tokens in zip(_record_ids(batch), batch["tokens"]):
    assert tokenizer.decode(tokens) == WORDS[record % 4]  # image and caption stay paired
    assert tokens.tolist().count(tokenizer.eos_id) == 1


def test_geneval_tfds_source_feeds_the_pipeline(tokenizer, tmp_path):
  builder = gst.prepare(tmp_path, image_size=SIZE, num_train=24, num_test=4, seed=0)
  source = builder.as_data_source("train")
  captions = pipeline.read_captions(source)
  assert captions == [e.caption for e in gs.generate_examples(0, 24, SIZE)]
  batch = next(_iterator(source, tokenizer, batch_size=8, shuffle=False, num_epochs=1))
  expected = list(gs.generate_examples(0, 8, SIZE))
  np.testing.assert_allclose(
    batch["image"], np.stack([e.image for e in expected]) / 127.5 - 1.0, atol=1e-6
  )
  assert [tokenizer.decode(t) for t in batch["tokens"]] == [e.caption for e in expected]


def test_same_seed_same_batches_other_seed_other_order(tokenizer):
  first = _take(_iterator(IndexedSource(40), tokenizer), 6)
  again = _take(_iterator(IndexedSource(40), tokenizer), 6)
  other = _take(_iterator(IndexedSource(40), tokenizer, seed=8), 6)
  _assert_same_batches(first, again)
  assert [_record_ids(b) for b in first] != [_record_ids(b) for b in other]
  unshuffled = _take(_iterator(IndexedSource(40), tokenizer, shuffle=False), 2)
  assert [_record_ids(b) for b in unshuffled] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_epochs_cover_every_record_and_reshuffle(tokenizer):
  iterator = _iterator(IndexedSource(40), tokenizer)
  epoch1 = sum((_record_ids(b) for b in _take(iterator, 10)), [])
  epoch2 = sum((_record_ids(b) for b in _take(iterator, 10)), [])
  assert sorted(epoch1) == sorted(epoch2) == list(range(40))
  assert epoch1 != epoch2


def test_single_pass_stops_and_keeps_the_remainder_on_request(tokenizer):
  kept = list(_iterator(IndexedSource(10), tokenizer, num_epochs=1, drop_remainder=False))
  assert [len(b["tokens"]) for b in kept] == [4, 4, 2]
  assert sorted(sum((_record_ids(b) for b in kept), [])) == list(range(10))
  dropped = list(_iterator(IndexedSource(10), tokenizer, num_epochs=1, drop_remainder=True))
  assert [len(b["tokens"]) for b in dropped] == [4, 4]


def test_process_shards_are_disjoint_and_cover_the_data(tokenizer):
  shards = []
  for index in range(3):
    batches = _iterator(
      IndexedSource(31),
      tokenizer,
      batch_size=2,
      num_epochs=1,
      drop_remainder=False,
      shard_index=index,
      shard_count=3,
    )
    shards.append(set(sum((_record_ids(b) for b in batches), [])))
  assert sum(len(s) for s in shards) == 31
  assert set().union(*shards) == set(range(31))
  # With the JAX defaults (one process here) the only shard is everything.
  default = _iterator(IndexedSource(31), tokenizer, batch_size=31, num_epochs=1)
  assert sorted(_record_ids(next(default))) == list(range(31))
  with pytest.raises(ValueError):
    _iterator(IndexedSource(31), tokenizer, shard_index=3, shard_count=3)


@pytest.mark.parametrize("consumed", [3, 12])  # 12 batches crosses into the second epoch
def test_restored_state_reproduces_the_following_batches(tokenizer, consumed):
  iterator = _iterator(IndexedSource(40), tokenizer)
  _take(iterator, consumed)
  state = json.loads(json.dumps(iterator.get_state()))  # must survive a JSON checkpoint
  expected = _take(iterator, 5)
  resumed = _iterator(IndexedSource(40), tokenizer)
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 5), expected)


def test_bad_records_are_skipped_and_counted(tokenizer):
  source = PlantedBadSource()
  batches = list(
    _iterator(source, tokenizer, batch_size=2, shuffle=False, num_epochs=1, drop_remainder=False)
  )
  assert [_record_ids(b) for b in batches] == [[0, 1], [2, 3], [4, 5]]
  # Skips are charged to the batch being filled when they are met; 8 bad records in all.
  assert [int(b["num_skipped"]) for b in batches] == [1, 2, 5]
  assert [tokenizer.decode(t) for t in batches[1]["tokens"]] == [WORDS[2], WORDS[3]]


def test_source_without_any_usable_record_raises_instead_of_spinning(tokenizer):
  source = PlantedBadSource()
  source.records = [
    r
    for r in source.records
    if isinstance(r, str) or (isinstance(r, dict) and r.get("caption") == "")
  ]
  with pytest.raises(RuntimeError, match="consecutive unusable records"):
    next(_iterator(source, tokenizer))


def test_worker_processes_batch_records_in_turn_deterministically_and_resume(tokenizer, tmp_path):
  source = gst.prepare(tmp_path, image_size=SIZE, num_train=40, num_test=4, seed=0).as_data_source(
    "train"
  )
  reference = _take(_iterator(source, tokenizer), 6)
  with_workers = _iterator(source, tokenizer, worker_count=2)
  try:
    first = _take(with_workers, 2)
    state = with_workers.get_state()
    rest = _take(with_workers, 4)
  finally:
    with_workers.close()
  # Worker w batches records w, w + 2, ... of the same shuffled order: the same records in
  # other batches.
  batch = len(reference[0]["image"])
  flat = lambda images: np.concatenate(images).reshape(-1, batch * 2, *images[0].shape[1:])
  ours, theirs = flat([b["image"] for b in first + rest]), flat([b["image"] for b in reference])
  for pair in range(len(ours)):
    for worker in range(2):
      np.testing.assert_array_equal(ours[pair][worker * batch:(worker + 1) * batch],
                                    theirs[pair][worker::2])
  resumed = _iterator(source, tokenizer, worker_count=2)
  try:
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 4), rest)
  finally:
    resumed.close()


def test_latent_records_are_taken_unscaled_and_bad_latents_skipped(tokenizer):
  """latent_channels reads float latents as they are; NaN/inf, wrong shapes, integer arrays and
  channel counts other than the model's are bad records, counted like undecodable images."""
  channels = 4

  def latent(i):
    return np.full((SIZE, SIZE, channels), 3.5 + i, np.float32)  # far outside [-1, 1]

  nan_latent = latent(9)
  nan_latent[3, 4, 1] = np.nan
  inf_latent = latent(8)
  inf_latent[0, 0, 0] = -np.inf
  records = [
    {"latent": latent(0), "caption": b"a circle"},
    {"latent": nan_latent, "caption": b"a circle"},
    {"latent": inf_latent, "caption": b"a circle"},
    {"latent": np.zeros((SIZE, SIZE, 3), np.float32), "caption": b"a circle"},  # 3 channels
    {"latent": np.zeros((8, 8, channels), np.float32), "caption": b"a circle"},  # wrong size
    {"latent": np.zeros((SIZE, SIZE, channels), np.uint8), "caption": b"a circle"},  # not float
    {"latent": latent(1).astype(np.float64), "caption": b"two squares"},
  ]
  batches = list(
    _iterator(records, tokenizer, batch_size=2, shuffle=False, num_epochs=1, image_key="latent",
              latent_channels=channels)
  )
  [batch] = batches
  assert int(batch["num_skipped"]) == 5
  assert batch["image"].dtype == np.float32 and batch["image"].shape == (2, SIZE, SIZE, channels)
  np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], [3.5, 4.5])
  assert [tokenizer.decode(t) for t in batch["tokens"]] == ["a circle", "two squares"]

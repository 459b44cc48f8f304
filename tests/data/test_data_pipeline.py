"""The input pipeline: batch layout, the global order (same batches for any number of
processes, resumption from a step), bad records and worker processes."""

import numpy as np
import pytest

from ecdit_jax.data import geneval_shapes as gs
from ecdit_jax.data import geneval_shapes_tfds as gst
from ecdit_jax.data import pipeline
from ecdit_jax.data import tokenizer as tk
from tests.data.records import MAX_LEN, SIZE, WORDS, IndexedSource, PlantedBadSource, record_ids


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  captions = list(WORDS) + [e.caption for e in gs.generate_examples(3, 300)]
  return tk.train_tokenizer(captions, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=100)


def _preprocess(tokenizer, **overrides):
  kwargs = dict(image_key="image", text_key="caption", **overrides)
  return pipeline.Preprocess(tokenizer, SIZE, MAX_LEN, **kwargs)


def _batches(source, tokenizer, *, global_batch=4, seed=7, process_index=0, process_count=1,
             start_step=0, worker_count=0, preprocess=None):
  order = pipeline.GlobalOrder(len(source), seed, global_batch)
  return pipeline.make_batches(source, preprocess or _preprocess(tokenizer), order=order,
                               process_index=process_index, process_count=process_count,
                               start_step=start_step, worker_count=worker_count)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_batch_layout_dtypes_ranges_and_pairing(tokenizer):
  batch = next(_batches(IndexedSource(40), tokenizer))
  assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
  assert batch["tokens"].shape == (4, MAX_LEN) and batch["tokens"].dtype == np.int32
  assert batch["num_skipped"] == 0 and batch["num_skipped"].dtype == np.int32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  for record, tokens in zip(record_ids(batch), batch["tokens"]):
    assert tokenizer.decode(tokens) == WORDS[record % 4]  # image and caption stay paired
    assert tokens.tolist().count(tokenizer.eos_id) == 1


def test_geneval_tfds_source_feeds_the_pipeline(tokenizer, tmp_path):
  builder = gst.prepare(tmp_path, image_size=SIZE, num_train=24, num_test=4, seed=0)
  source = builder.as_data_source("train")
  captions = pipeline.read_captions(source)
  assert captions == [e.caption for e in gs.generate_examples(0, 24, SIZE)]
  [(chunk, skipped)] = list(pipeline.read_in_order(source, _preprocess(tokenizer), chunk=100))
  expected = list(gs.generate_examples(0, 24, SIZE))
  assert skipped == 0
  np.testing.assert_allclose(
    chunk["image"], np.stack([e.image for e in expected]) / 127.5 - 1.0, atol=1e-6
  )
  assert [tokenizer.decode(t) for t in chunk["tokens"]] == [e.caption for e in expected]


def test_same_seed_same_batches_other_seed_other_order(tokenizer):
  first = _take(_batches(IndexedSource(40), tokenizer), 6)
  again = _take(_batches(IndexedSource(40), tokenizer), 6)
  other = _take(_batches(IndexedSource(40), tokenizer, seed=8), 6)
  _assert_same_batches(first, again)
  assert [record_ids(b) for b in first] != [record_ids(b) for b in other]


def test_epochs_cover_every_record_and_reshuffle(tokenizer):
  iterator = _batches(IndexedSource(40), tokenizer)
  epoch1 = sum((record_ids(b) for b in _take(iterator, 10)), [])
  epoch2 = sum((record_ids(b) for b in _take(iterator, 10)), [])
  assert sorted(epoch1) == sorted(epoch2) == list(range(40))
  assert epoch1 != epoch2


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_the_rows_of_the_same_global_batches(tokenizer, process_count):
  """Any number of processes, each taking its rows, reads exactly one process's batches."""
  alone = _take(_batches(IndexedSource(30), tokenizer, global_batch=8), 9)  # crosses epochs
  parts = [_take(_batches(IndexedSource(30), tokenizer, global_batch=8, process_index=p,
                          process_count=process_count), 9) for p in range(process_count)]
  for step, batch in enumerate(alone):
    rows = [part[step] for part in parts]
    assert record_ids(batch) == sum((record_ids(r) for r in rows), [])
  with pytest.raises(ValueError, match="does not split"):
    next(_batches(IndexedSource(30), tokenizer, global_batch=8, process_count=3))


@pytest.mark.parametrize("start_step", [3, 12])  # step 12 lies in the second epoch
def test_starting_at_a_step_gives_the_batches_from_that_step(tokenizer, start_step):
  straight = _take(_batches(IndexedSource(40), tokenizer), start_step + 5)
  resumed = _take(_batches(IndexedSource(40), tokenizer, start_step=start_step), 5)
  _assert_same_batches(resumed, straight[start_step:])
  # ... and on another number of processes, the same global rows.
  halves = [_take(_batches(IndexedSource(40), tokenizer, start_step=start_step,
                           process_index=p, process_count=2), 5) for p in range(2)]
  for step in range(5):
    assert record_ids(straight[start_step + step]) == (record_ids(halves[0][step])
                                                       + record_ids(halves[1][step]))


def test_bad_records_are_replaced_by_the_next_usable_and_counted(tokenizer):
  source = PlantedBadSource()  # 6 good records among 14
  order = pipeline.GlobalOrder(len(source), 7, 2)
  batches = _take(_batches(source, tokenizer, global_batch=2), 7)  # one epoch of positions
  good = {0: 0, 2: 1, 3: 2, 6: 3, 12: 4, 13: 5}  # record index -> its image's id
  for step, batch in enumerate(batches):
    for position, got in zip(range(2 * step, 2 * step + 2), record_ids(batch)):
      # The record the order puts here, or the first usable one after it in the epoch's
      # order (cyclically).
      epoch_start = position // 14 * 14
      candidates = [order.record(epoch_start + (position + a) % 14) for a in range(14)]
      expected = next(good[r] for r in candidates if r in good)
      assert got == expected
  replaced = sum(int(b["num_skipped"]) for b in batches)
  assert replaced >= 8  # every bad record's position was filled from further on
  assert [tokenizer.decode(t) for t in batches[0]["tokens"]] == [
      WORDS[i % 4] for i in record_ids(batches[0])]


def test_source_without_any_usable_record_raises_instead_of_spinning(tokenizer):
  source = PlantedBadSource()
  source.records = [
    r
    for r in source.records
    if isinstance(r, str) or (isinstance(r, dict) and r.get("caption") == "")
  ]
  with pytest.raises(RuntimeError, match="consecutive unusable records"):
    next(_batches(source, tokenizer))


def test_read_in_order_takes_a_shard_and_counts_skips(tokenizer):
  chunks = list(pipeline.read_in_order(PlantedBadSource(), _preprocess(tokenizer), chunk=5))
  assert [record_ids(c) if c else [] for c, _ in chunks] == [[0, 1, 2], [3], [4, 5]]
  assert [skipped for _, skipped in chunks] == [2, 4, 2]
  shards = [list(pipeline.read_in_order(IndexedSource(31), _preprocess(tokenizer), chunk=4,
                                        shard_index=i, shard_count=3)) for i in range(3)]
  ids = [sum((record_ids(c) for c, _ in shard), []) for shard in shards]
  assert ids[1] == list(range(1, 31, 3)) and sorted(sum(ids, [])) == list(range(31))


def test_worker_processes_give_the_same_batches(tokenizer, tmp_path):
  source = gst.prepare(tmp_path, image_size=SIZE, num_train=40, num_test=4, seed=0).as_data_source(
    "train"
  )
  reference = _take(_batches(source, tokenizer), 6)
  with_workers = _batches(source, tokenizer, worker_count=2, start_step=2)
  try:
    _assert_same_batches(_take(with_workers, 4), reference[2:])
  finally:
    with_workers.close()


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
  preprocess = pipeline.Preprocess(tokenizer, SIZE, MAX_LEN, "latent", "caption",
                                   latent_channels=channels)
  [(chunk, skipped)] = list(pipeline.read_in_order(records, preprocess))
  assert skipped == 5
  assert chunk["image"].dtype == np.float32 and chunk["image"].shape == (2, SIZE, SIZE, channels)
  np.testing.assert_array_equal(chunk["image"][:, 0, 0, 0], [3.5, 4.5])
  assert [tokenizer.decode(t) for t in chunk["tokens"]] == ["a circle", "two squares"]

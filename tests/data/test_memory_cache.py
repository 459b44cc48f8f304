"""The in-memory dataset: the pipeline's records bit for bit, served in the global order."""

import numpy as np
import pytest

from ecdit_jax.data import memory_cache, pipeline
from ecdit_jax.data import tokenizer as tk
from tests.data.records import MAX_LEN, SIZE, WORDS, IndexedSource, PlantedBadSource, record_ids


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tk.train_tokenizer(list(WORDS) * 10, tmp_path_factory.mktemp("tok") / "t.model",
                            vocab_size=40)


def _preprocess(tokenizer, scale):
  return pipeline.Preprocess(tokenizer, SIZE, MAX_LEN, "image", "caption", scale=scale)


def _decode(source, tokenizer):
  return memory_cache.decode_all(source, _preprocess(tokenizer, scale=False))


def _cached(records, **overrides):
  kwargs = {"global_batch": 4, "seed": 3, "process_index": 0, "process_count": 1, **overrides}
  return memory_cache.CachedBatches(records, **kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_cached_records_are_bit_for_bit_the_pipelines(tokenizer):
  source = IndexedSource(23)  # PNG-encoded and raw images mixed
  records = _decode(source, tokenizer)
  assert records.arrays["image"].dtype == np.uint8 and len(records) == 23
  assert records.num_skipped == 0
  [(single_pass, _)] = list(pipeline.read_in_order(source, _preprocess(tokenizer, scale=True)))
  from_cache = records.batch(np.arange(23))
  assert from_cache["image"].dtype == np.float32
  np.testing.assert_array_equal(from_cache["image"], single_pass["image"])
  np.testing.assert_array_equal(from_cache["tokens"], single_pass["tokens"])


def test_cached_batches_are_the_streamed_ones_when_every_record_is_usable(tokenizer):
  source = IndexedSource(22)
  order = pipeline.GlobalOrder(len(source), 3, 4)
  streamed = _take(pipeline.make_batches(source, _preprocess(tokenizer, scale=True), order=order,
                                         process_index=0, process_count=1), 12)
  cached = _take(_cached(_decode(source, tokenizer)), 12)
  for a, b in zip(cached, streamed):
    for key in ("image", "tokens"):
      np.testing.assert_array_equal(a[key], b[key])


def test_bad_records_are_left_out_and_counted_once(tokenizer):
  records = _decode(PlantedBadSource(), tokenizer)
  assert records.num_skipped == 8 and len(records) == 6
  assert record_ids(records.batch(np.arange(6))) == [0, 1, 2, 3, 4, 5]
  batches = _take(_cached(records, global_batch=2), 5)
  assert [int(b["num_skipped"]) for b in batches] == [8, 0, 0, 0, 0]


def test_each_epoch_is_a_new_permutation_fixed_by_the_seed(tokenizer):
  records = _decode(IndexedSource(20), tokenizer)
  batches = _take(_cached(records), 15)  # 5 batches of 4 an epoch
  epochs = [[r for b in batches[i:i + 5] for r in record_ids(b)] for i in (0, 5, 10)]
  for ids in epochs:
    assert sorted(ids) == list(range(20))
  assert epochs[0] != epochs[1] != epochs[2]
  again = _take(_cached(records), 15)
  assert [record_ids(b) for b in again] == [record_ids(b) for b in batches]
  other = _take(_cached(records, seed=4), 5)
  assert [record_ids(b) for b in other] != [record_ids(b) for b in batches[:5]]


@pytest.mark.parametrize("start_step", [3, 7])
def test_any_start_step_and_process_count_give_the_same_global_batches(tokenizer, start_step):
  records = _decode(IndexedSource(22), tokenizer)
  straight = [record_ids(b) for b in _take(_cached(records), start_step + 4)]
  halves = [_take(_cached(records, start_step=start_step, process_index=p, process_count=2), 4)
            for p in range(2)]
  for step in range(4):
    assert straight[start_step + step] == (record_ids(halves[0][step])
                                           + record_ids(halves[1][step]))


def test_too_few_records_are_refused(tokenizer):
  records = _decode(IndexedSource(3), tokenizer)
  with pytest.raises(ValueError, match="cannot fill a batch of 4"):
    _cached(records)
  only_bad = PlantedBadSource()
  only_bad.records = [r for r in only_bad.records if isinstance(r, str)] * 2
  with pytest.raises(ValueError, match="no usable record among the 2 "):
    _decode(only_bad, tokenizer)

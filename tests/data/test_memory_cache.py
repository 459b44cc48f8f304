"""The in-memory dataset: same records as the pipeline, epochs as permutations, resumable."""

import json

import numpy as np
import pytest
from test_data_pipeline import MAX_LEN, SIZE, WORDS, IndexedSource, PlantedBadSource, _record_ids

from ecdit_jax.data import memory_cache, pipeline
from ecdit_jax.data import tokenizer as tk


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tk.train_tokenizer(list(WORDS) * 10, tmp_path_factory.mktemp("tok") / "t.model",
                            vocab_size=40)


def _decode(source, tokenizer, **overrides):
  kwargs = {"tokenizer": tokenizer, "image_size": SIZE, "max_text_len": MAX_LEN,
            "shard_index": 0, "shard_count": 1, **overrides}
  return memory_cache.decode_all(source, **kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_cached_records_are_bit_for_bit_the_pipelines(tokenizer):
  source = IndexedSource(23)  # PNG-encoded and raw images mixed
  records = _decode(source, tokenizer)
  assert records.images.dtype == np.uint8 and len(records) == 23 and records.num_skipped == 0
  single_pass = next(pipeline.make_dataset_iterator(
      source, tokenizer=tokenizer, batch_size=23, image_size=SIZE, max_text_len=MAX_LEN, seed=0,
      shuffle=False, num_epochs=1, shard_index=0, shard_count=1))
  from_cache = records.batch(np.arange(23))
  assert from_cache["image"].dtype == np.float32
  np.testing.assert_array_equal(from_cache["image"], single_pass["image"])
  np.testing.assert_array_equal(from_cache["tokens"], single_pass["tokens"])


def test_bad_records_are_skipped_and_counted_once(tokenizer):
  records = _decode(PlantedBadSource(), tokenizer)
  assert records.num_skipped == 8 and len(records) == 6
  assert _record_ids(records.batch(np.arange(6))) == [0, 1, 2, 3, 4, 5]
  batches = _take(memory_cache.CachedBatchIterator(records, batch_size=2, seed=0), 5)
  assert [int(b["num_skipped"]) for b in batches] == [8, 0, 0, 0, 0]


def test_each_epoch_is_a_new_permutation_fixed_by_the_seed(tokenizer):
  records = _decode(IndexedSource(22), tokenizer)
  # 22 records in batches of 4: 5 batches an epoch, 2 records left out of each epoch.
  batches = _take(memory_cache.CachedBatchIterator(records, batch_size=4, seed=3), 15)
  epochs = [[r for b in batches[i:i + 5] for r in _record_ids(b)] for i in (0, 5, 10)]
  for ids in epochs:
    assert len(set(ids)) == 20 and set(ids) <= set(range(22))
  assert epochs[0] != epochs[1] != epochs[2]
  again = _take(memory_cache.CachedBatchIterator(records, batch_size=4, seed=3), 15)
  assert [_record_ids(b) for b in again] == [_record_ids(b) for b in batches]
  other = _take(memory_cache.CachedBatchIterator(records, batch_size=4, seed=4), 5)
  assert [_record_ids(b) for b in other] != [_record_ids(b) for b in batches[:5]]


@pytest.mark.parametrize("consumed", [0, 3, 5, 7])  # inside, at the end of and past an epoch
def test_restored_position_gives_the_following_batches(tokenizer, consumed):
  records = _decode(IndexedSource(22), tokenizer)
  iterator = memory_cache.CachedBatchIterator(records, batch_size=4, seed=0)
  _take(iterator, consumed)
  state = json.loads(json.dumps(iterator.get_state()))  # must survive a JSON checkpoint
  expected = [_record_ids(b) for b in _take(iterator, 6)]
  resumed = memory_cache.CachedBatchIterator(records, batch_size=4, seed=0)
  resumed.set_state(state)
  assert [_record_ids(b) for b in _take(resumed, 6)] == expected


def test_a_position_from_another_dataset_or_batch_size_is_refused(tokenizer):
  records = _decode(IndexedSource(22), tokenizer)
  state = memory_cache.CachedBatchIterator(records, batch_size=4, seed=0).get_state()
  with pytest.raises(ValueError, match="batch_size"):
    memory_cache.CachedBatchIterator(records, batch_size=2, seed=0).set_state(state)
  streaming = pipeline.make_dataset_iterator(
      IndexedSource(22), tokenizer=tokenizer, batch_size=4, image_size=SIZE, max_text_len=MAX_LEN,
      seed=0, shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match="cache_in_memory=False"):
    memory_cache.CachedBatchIterator(records, batch_size=4, seed=0).set_state(
        streaming.get_state())
  fewer = _decode(IndexedSource(21), tokenizer)
  with pytest.raises(ValueError, match="num_records"):
    memory_cache.CachedBatchIterator(fewer, batch_size=4, seed=0).set_state(state)


def test_shards_split_the_records_and_too_few_records_are_refused(tokenizer):
  shards = [_decode(IndexedSource(10), tokenizer, shard_index=i, shard_count=3) for i in range(3)]
  ids = [_record_ids(s.batch(np.arange(len(s)))) for s in shards]
  assert ids == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
  with pytest.raises(ValueError, match="cannot fill a batch of 5"):
    memory_cache.CachedBatchIterator(shards[1], batch_size=5, seed=0)
  only_bad = PlantedBadSource()
  only_bad.records = [r for r in only_bad.records if isinstance(r, str)] * 2
  with pytest.raises(ValueError, match="no usable record among the 2 "):
    _decode(only_bad, tokenizer)

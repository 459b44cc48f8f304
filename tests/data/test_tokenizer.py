"""The SentencePiece tokenizer: T5 special ids, eos/pad layout, truncation, training and caching."""

import os
import pickle

import numpy as np
import pytest

from ecdit_jax.data import geneval_shapes as gs
from ecdit_jax.data import tokenizer as tk


@pytest.fixture(scope="module")
def captions():
  return [e.caption for e in gs.generate_examples(seed=1, num_examples=600)]


@pytest.fixture(scope="module")
def trained(captions, tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "shapes.model"
  return path, tk.train_tokenizer(captions, path, vocab_size=100)


def test_t5_special_ids(trained):
  _, tokenizer = trained
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2)
  processor = tokenizer._processor
  assert processor.bos_id() == -1
  assert [processor.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
  assert 20 < tokenizer.vocab_size <= 100


def test_every_caption_word_is_one_piece_and_round_trips(trained, captions):
  _, tokenizer = trained
  words = {w for c in captions for w in c.split()}
  plurals = {f"{shape}s" for shape in gs.SHAPES}
  assert len(words) > 20
  for word in words:
    # Whole words, not fragments; a plural may be its singular plus "s".
    assert len(tokenizer.encode(word)) <= (2 if word in plurals else 1), word
  tokens = tokenizer.encode_batch(captions, max_len=16)
  assert [tokenizer.decode(row) for row in tokens] == captions
  assert tk.UNK_ID not in tokens


def test_eos_then_padding_layout_and_truncation(trained):
  _, tokenizer = trained
  texts = ["a red circle", "", "   ", "a purple triangle to the left of a square and two circles"]
  tokens = tokenizer.encode_batch(texts, max_len=6)
  assert tokens.dtype == np.int32 and tokens.shape == (4, 6)
  ids = tokenizer.encode("a red circle")
  assert tokens[0].tolist() == ids + [1] + [0] * (5 - len(ids))
  assert tokens[1].tolist() == [1, 0, 0, 0, 0, 0]  # the null caption for guidance
  assert tokens[2].tolist() == [1, 0, 0, 0, 0, 0]
  long_ids = tokenizer.encode(texts[3])
  assert len(long_ids) > 6
  assert tokens[3].tolist() == long_ids[:5] + [1]  # truncated, eos kept last
  assert tokenizer.encode_batch(["a red circle"], max_len=1).tolist() == [[1]]
  with pytest.raises(ValueError):
    tokenizer.encode_batch(["a"], max_len=0)


def test_unknown_words_map_to_unk(trained):
  _, tokenizer = trained
  assert tk.UNK_ID in tokenizer.encode("a zebra")


def test_training_is_deterministic_and_atomic(trained, captions, tmp_path):
  path, _ = trained
  again = tmp_path / "again.model"
  tk.train_tokenizer(captions, again, vocab_size=100)
  assert again.read_bytes() == path.read_bytes()
  assert os.listdir(tmp_path) == ["again.model"]  # no temporary files left behind
  with pytest.raises(ValueError):
    tk.train_tokenizer(["", "  "], tmp_path / "empty.model")


def test_get_or_train_uses_given_model_else_trains_once_and_caches(trained, captions, tmp_path):
  path, tokenizer = trained
  calls = []

  def captions_fn():
    calls.append(1)
    return captions

  def must_not_be_called():
    raise AssertionError("captions were read although a model exists")

  cache = tmp_path / "cache" / "tok.model"
  first = tk.get_or_train_tokenizer(None, cache, captions_fn, vocab_size=100)
  second = tk.get_or_train_tokenizer(None, cache, must_not_be_called, vocab_size=100)
  assert calls == [1] and cache.exists()
  assert first.model_proto == second.model_proto == tokenizer.model_proto
  given = tk.get_or_train_tokenizer(str(path), tmp_path / "unused.model", must_not_be_called)
  assert given.model_proto == path.read_bytes()
  assert not (tmp_path / "unused.model").exists()
  with pytest.raises(FileNotFoundError):
    tk.get_or_train_tokenizer(str(tmp_path / "missing.model"), cache, must_not_be_called)


def test_tokenizer_survives_pickling(trained):
  path, tokenizer = trained
  clone = pickle.loads(pickle.dumps(tokenizer))
  loaded = tk.load_tokenizer(path)
  texts = ["three triangles", "a blue square above a circle"]
  assert np.array_equal(clone.encode_batch(texts, 8), tokenizer.encode_batch(texts, 8))
  assert np.array_equal(loaded.encode_batch(texts, 8), tokenizer.encode_batch(texts, 8))

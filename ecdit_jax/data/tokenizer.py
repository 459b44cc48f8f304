"""SentencePiece tokenizer with T5's special ids (pad=0, eos=1, unk=2, no bos).

Either loads an existing model (for instance T5's own ``spiece.model``) or trains a small unigram
model on the dataset's captions and caches it. Token sequences end with eos and are right-padded
with pad, so the empty caption encodes to ``[eos, pad, pad, ...]``: the null text used for
classifier-free guidance.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

from ecdit_jax.fileio import write_atomic

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


class Tokenizer:
  """A SentencePiece processor with fixed-length batch encoding; picklable for data workers."""

  def __init__(self, model_proto: bytes):
    self._model_proto = bytes(model_proto)
    self._processor = spm.SentencePieceProcessor(model_proto=self._model_proto)
    if self.pad_id < 0 or self.eos_id < 0:
      raise ValueError("the SentencePiece model must define pad and eos pieces")

  # Pickle the serialized model rather than the processor (a SWIG object), so that grain's
  # worker processes can receive the tokenizer.
  def __getstate__(self):
    return {"model_proto": self._model_proto}

  def __setstate__(self, state):
    self.__init__(state["model_proto"])

  @property
  def vocab_size(self) -> int:
    return self._processor.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._processor.pad_id()

  @property
  def eos_id(self) -> int:
    return self._processor.eos_id()

  @property
  def unk_id(self) -> int:
    return self._processor.unk_id()

  @property
  def model_proto(self) -> bytes:
    return self._model_proto

  def encode(self, text: str) -> list[int]:
    """Piece ids of ``text`` without eos or padding."""
    return list(self._processor.encode(text))

  def encode_batch(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """int32 (N, max_len): each text's ids laid out by ``pad_ids``."""
    # One string at a time: sentencepiece's list form starts a thread pool per call, which
    # costs far more than encoding a short caption.
    return np.stack([pad_ids(self._processor.encode(text), max_len, self.eos_id, self.pad_id)
                     for text in texts]) if texts else np.zeros((0, max_len), np.int32)

  def decode(self, ids) -> str:
    """Text of a sequence of ids; stops at the first eos and ignores padding."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if self.eos_id in ids:
      ids = ids[: ids.index(self.eos_id)]
    return self._processor.decode([i for i in ids if i != self.pad_id])


def pad_ids(ids: Sequence[int], max_len: int, eos_id: int = EOS_ID,
            pad_id: int = PAD_ID) -> np.ndarray:
  """int32 (max_len,): the ids, then eos, then padding; too-long texts are cut before the eos.
  ``pad_ids([], L)`` is the empty caption of a T5-style vocabulary."""
  if max_len < 1:
    raise ValueError(f"max_len must be at least 1 (room for eos), got {max_len}")
  out = np.full((max_len,), pad_id, dtype=np.int32)
  kept = list(ids[: max_len - 1]) + [eos_id]
  out[: len(kept)] = kept
  return out


def null_tokens(tokenizer, max_len: int) -> np.ndarray:
  """The empty caption as ``tokenizer`` encodes it ([eos, pad, ...] for T5-style vocabularies):
  the unconditional input of classifier-free guidance."""
  return np.asarray(tokenizer.encode_batch([""], max_len)[0])


def prompt_warnings(tokenizer, texts: Sequence[str], max_len: int) -> list[str]:
  """What tokenizing ``texts`` to ``max_len`` tokens changes about them, one line each: prompts
  cut to fit, and characters the vocabulary lacks (they become one unknown token). Tokenizers
  without ``encode`` (CLIP's byte-level BPE knows every character) are not checked."""
  encode, unk = getattr(tokenizer, "encode", None), getattr(tokenizer, "unk_id", None)
  if encode is None:
    return []
  lines = []
  for number, text in enumerate(texts, start=1):
    ids = encode(text)
    shown = text if len(text) <= 60 else text[:57] + "..."
    if len(ids) > max_len - 1:
      lines.append(f"prompt {number} is cut to its first {max_len - 1} of {len(ids)} tokens "
                   f"(text_max_len={max_len}, eos included): {shown!r}")
    if unk is not None and unk in ids:
      lines.append(f"prompt {number} holds characters the tokenizer does not know, each run of "
                   f"them read as one unknown token: {shown!r}")
  return lines


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Loads a ``.model`` file (e.g. T5's ``spiece.model`` or one written by ``train_tokenizer``)."""
  # epath reads local files and bucket URLs (gs://) alike.
  return Tokenizer(epath.Path(path).read_bytes())


def train_tokenizer(
  captions: Iterable[str], model_path: str | os.PathLike, vocab_size: int = 100
) -> Tokenizer:
  """Trains a unigram model with T5's special ids on ``captions`` and writes it to ``model_path``.

  ``vocab_size`` is an upper bound: a small caption corpus may not support that many pieces,
  and the soft vocabulary limit lets training succeed with fewer.
  """
  sentences = [c for c in (str(c).strip() for c in captions) if c]
  if not sentences:
    raise ValueError("cannot train a tokenizer on an empty caption corpus")
  # The unigram trainer seeds its vocabulary with repeated substrings that are followed by more
  # than one distinct character. In templated captions most words are always followed by a
  # space, so whole words would never be seeded and the model would spell them in fragments.
  # Adding each distinct word once as its own sentence gives every word a second right context.
  words = sorted({word for sentence in sentences for word in sentence.split()})
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(sentences + words),
    model_writer=model,
    model_type="unigram",
    vocab_size=vocab_size,
    hard_vocab_limit=False,
    character_coverage=1.0,
    pad_id=PAD_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    bos_id=-1,
    # One thread and no sampling so that the same captions always give the same model.
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    minloglevel=2,
  )
  write_atomic(model_path, model.getvalue())
  return Tokenizer(model.getvalue())


def get_or_train_tokenizer(
  path_or_none: str | os.PathLike | None,
  cache_path: str | os.PathLike,
  captions_fn: Callable[[], Iterable[str]],
  vocab_size: int = 100,
) -> Tokenizer:
  """An existing model if ``path_or_none`` is given, else the cached or freshly trained one.

  ``captions_fn`` is called only when a model has to be trained.
  """
  if path_or_none:
    if not epath.Path(path_or_none).exists():
      raise FileNotFoundError(f"tokenizer model {path_or_none} does not exist")
    return load_tokenizer(path_or_none)
  if epath.Path(cache_path).exists():
    return load_tokenizer(cache_path)
  return train_tokenizer(captions_fn(), cache_path, vocab_size)

"""CLIP's byte-level BPE tokenizer, read from a Hugging Face tokenizer directory.

The directory holds ``vocab.json`` (token -> id) and ``merges.txt`` (one merge per line, ranked by
line), optionally ``tokenizer_config.json`` / ``special_tokens_map.json`` naming the special
tokens. Encoding follows the ``transformers`` CLIP tokenizer:

1. The special tokens (start, end, pad, unknown) found verbatim in the text map to their ids; the
   rest is NFC-normalised, runs of whitespace become one space and everything is lowercased
   (no ftfy text repair, unlike OpenAI's original tokenizer).
2. CLIP's pre-tokenisation splits it into contractions, runs of letters, single digits and runs of
   other non-space characters (whitespace is dropped), then GPT-2's byte-level pattern splits
   each piece again, which only matters for pieces spelling CLIP's start or end string.
3. Each piece's UTF-8 bytes are spelled with printable stand-in characters (GPT-2's byte-level
   alphabet), ``</w>`` is attached to its last character and BPE merges are applied by rank.
4. The sequence is wrapped in ``<|startoftext|>`` ... ``<|endoftext|>``, truncated to the maximum
   length with the end token kept, and right-padded with the pad token.

Letters and numbers are the Unicode general categories L* and N* as Python's ``unicodedata``
knows them, and whitespace is the Unicode White_Space property, so plain ``re`` reproduces the
``\\p{L}``/``\\p{N}``/``\\s`` classes of the reference pattern exactly (up to differences between
Unicode versions for newly assigned characters).
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import sys
import unicodedata
from collections.abc import Sequence

import numpy as np
from etils import epath

from ecdit_jax.fileio import read_json

END_OF_WORD = "</w>"
DEFAULT_BOS = "<|startoftext|>"
DEFAULT_EOS = "<|endoftext|>"
DEFAULT_MAX_LENGTH = 77

# The Unicode White_Space property. Python's ``\s`` also matches U+001C..U+001F, which the
# reference tokenizer treats as punctuation.
_WHITESPACE = "\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """Maps every byte to a printable character, so that BPE works on text rather than bytes.

  Bytes that already print as visible Latin-1 characters stand for themselves; the others
  (control characters, space, ...) take the code points from 256 upwards, in byte order.
  """
  visible = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
             *range(ord("\xae"), ord("\xff") + 1)]
  mapping = {b: chr(b) for b in visible}
  next_code_point = 256
  for b in range(256):
    if b not in mapping:
      mapping[b] = chr(next_code_point)
      next_code_point += 1
  return dict(sorted(mapping.items()))


def _character_class(code_points: list[int]) -> str:
  """A regex character-class body listing ``code_points`` (sorted) as ranges."""
  parts = []
  start = previous = code_points[0]
  for cp in code_points[1:] + [-1]:
    if cp == previous + 1:
      previous = cp
      continue
    parts.append(re.escape(chr(start)) if start == previous else
                 f"{re.escape(chr(start))}-{re.escape(chr(previous))}")
    start = previous = cp
  return "".join(parts)


@functools.cache
def _pretokenize_patterns() -> tuple[re.Pattern, re.Pattern]:
  """CLIP's split pattern and the byte-level split applied to each of its pieces.

  The letter and number classes are spelled out from ``unicodedata``. CLIP's pattern keeps the
  strings ``<|startoftext|>`` and ``<|endoftext|>`` whole (they can appear through lowercasing);
  the byte-level split, GPT-2's pattern, then cuts them into "<|", the word and "|>". On every
  other piece it is the identity.
  """
  letters, numbers = [], []
  for cp in range(sys.maxunicode + 1):  # once per process: about 0.2 s
    category = unicodedata.category(chr(cp))[0]
    if category == "L":
      letters.append(cp)
    elif category == "N":
      numbers.append(cp)
  letter, number = _character_class(letters), _character_class(numbers)
  contractions = "'s|'t|'re|'ve|'m|'ll|'d"
  other = f"[^{_WHITESPACE}{letter}{number}]+"
  clip_pattern = re.compile(rf"<\|startoftext\|>|<\|endoftext\|>|{contractions}|[{letter}]+"
                            f"|[{number}]|{other}")
  # Pieces hold no whitespace, so GPT-2's optional leading space and whitespace runs are moot.
  byte_level_pattern = re.compile(f"{contractions}|[{letter}]+|[{number}]+|{other}")
  return clip_pattern, byte_level_pattern


def _token_content(token) -> str | None:
  """Special tokens appear either as strings or as ``{"content": ...}`` objects."""
  if isinstance(token, dict):
    return token.get("content")
  return token


class ClipTokenizer:
  """Byte-level BPE with CLIP's normalisation, special tokens and fixed-length batches."""

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
               bos_token: str = DEFAULT_BOS, eos_token: str = DEFAULT_EOS,
               pad_token: str | None = None, unk_token: str | None = None,
               model_max_length: int = DEFAULT_MAX_LENGTH):
    self.vocab = dict(vocab)
    self.merge_ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
    # CLIP has no dedicated pad or unknown token: both default to the end token.
    pad_token = eos_token if pad_token is None else pad_token
    unk_token = eos_token if unk_token is None else unk_token
    for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token),
                        ("unk", unk_token)):
      if token not in self.vocab:
        raise ValueError(f"the {name} token {token!r} is not in the vocabulary")
    self.bos_token, self.eos_token = bos_token, eos_token
    self.pad_token, self.unk_token = pad_token, unk_token
    self.model_max_length = model_max_length
    self._byte_encoder = bytes_to_unicode()
    # As in ``transformers``, every special token found in the raw text is taken whole, the pad
    # and unknown tokens included (a pad token "!" therefore splits "left!" into "left", "!").
    # Longer tokens come first so that none is cut short by a token it starts with.
    self._special_tokens = tuple(sorted({bos_token, eos_token, pad_token, unk_token}, key=len,
                                        reverse=True))
    self._special_split = re.compile("(" + "|".join(map(re.escape, self._special_tokens)) + ")")
    self._bpe_cache: dict[str, tuple[str, ...]] = {}

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> ClipTokenizer:
    """Reads ``vocab.json`` and ``merges.txt`` (and the special tokens if configured)."""
    path = epath.Path(path)
    if not path.is_dir():
      raise FileNotFoundError(f"tokenizer directory not found: {path}")
    vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
    for required in (vocab_file, merges_file):
      if not required.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {required}")
    vocab = read_json(vocab_file)
    merges = []
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    for line_number, line in enumerate(lines, start=1):
      if not line or (line_number == 1 and line.startswith("#version")):
        continue
      pair = line.split(" ")
      if len(pair) != 2:
        raise ValueError(f"{merges_file}:{line_number}: expected two symbols, got {line!r}")
      merges.append((pair[0], pair[1]))

    settings = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
      config_file = path / name
      if config_file.is_file():
        settings.update({k: v for k, v in read_json(config_file).items() if v is not None})
    special = {name: _token_content(settings.get(name))
               for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    max_length = settings.get("model_max_length", DEFAULT_MAX_LENGTH)
    if not isinstance(max_length, int) or max_length > 1_000_000:  # "unlimited" sentinel
      max_length = DEFAULT_MAX_LENGTH
    return cls(vocab, merges, bos_token=special["bos_token"] or DEFAULT_BOS,
               eos_token=special["eos_token"] or DEFAULT_EOS, pad_token=special["pad_token"],
               unk_token=special["unk_token"], model_max_length=max_length)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  @property
  def bos_id(self) -> int:
    return self.vocab[self.bos_token]

  @property
  def eos_id(self) -> int:
    return self.vocab[self.eos_token]

  @property
  def pad_id(self) -> int:
    return self.vocab[self.pad_token]

  @property
  def unk_id(self) -> int:
    return self.vocab[self.unk_token]

  def _bpe(self, piece: str) -> tuple[str, ...]:
    """Merges the symbols of one pre-tokenised piece, lowest-ranked pair first."""
    if piece in self._bpe_cache:
      return self._bpe_cache[piece]
    symbols = list(piece[:-1]) + [piece[-1] + END_OF_WORD]
    while len(symbols) > 1:
      ranked = [(self.merge_ranks.get(pair, sys.maxsize), pair)
                for pair in itertools.pairwise(symbols)]
      best_rank, best = min(ranked, key=lambda item: item[0])
      if best_rank == sys.maxsize:
        break
      # Merge every occurrence of the best pair, scanning left to right.
      merged, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
          merged.append(symbols[i] + symbols[i + 1])
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    result = tuple(symbols)
    self._bpe_cache[piece] = result
    return result

  def tokenize(self, text: str) -> list[str]:
    """BPE tokens of ``text``, without the start and end tokens."""
    clip_pattern, byte_level_pattern = _pretokenize_patterns()
    tokens = []
    # With a capturing group, re.split puts the special tokens at the odd indices.
    for index, segment in enumerate(self._special_split.split(text)):
      if index % 2:
        tokens.append(segment)
        continue
      segment = unicodedata.normalize("NFC", segment)
      segment = re.sub(f"[{_WHITESPACE}]+", " ", segment).lower()
      for piece in clip_pattern.findall(segment):
        for word in byte_level_pattern.findall(piece):
          tokens.extend(self._bpe("".join(self._byte_encoder[b] for b in word.encode("utf-8"))))
    return tokens

  def encode(self, text: str) -> list[int]:
    """Ids of ``text`` between the start and end tokens, neither truncated nor padded."""
    unk = self.unk_id
    body = [self.vocab.get(token, unk) for token in self.tokenize(text)]
    return [self.bos_id, *body, self.eos_id]

  def encode_batch(self, texts: Sequence[str],
                   max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention_mask), both int32 (len(texts), max_length).

    Longer texts lose their last tokens but keep the end token; shorter ones are right-padded
    with the pad token and masked out.
    """
    max_length = self.model_max_length if max_length is None else max_length
    if max_length < 2:
      raise ValueError(f"max_length must leave room for the start and end tokens: {max_length}")
    ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int32)
    mask = np.zeros((len(texts), max_length), dtype=np.int32)
    for row, text in enumerate(texts):
      tokens = self.encode(text)
      if len(tokens) > max_length:
        tokens = tokens[:max_length - 1] + [self.eos_id]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return ids, mask


def load_clip_tokenizer(path: str | os.PathLike) -> ClipTokenizer:
  """The tokenizer stored in the Hugging Face tokenizer directory ``path``."""
  return ClipTokenizer.from_dir(path)

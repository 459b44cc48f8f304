"""Input pipeline: a random-access source -> decoded, tokenized batches in a global order.

Works with any random-access source of dict records holding an image and a caption (a TFDS
``data_source``, ``builder.as_data_source(split)``, or any object with ``__len__``/``__getitem__``).
The image is either pixels (uint8 RGB, scaled to [-1, 1] here) or precomputed VAE latents
(float32 (S, S, C), already scaled by the VAE's factor: a ``data.latents.LatentSource``).

The order of the records is global (``GlobalOrder``): each epoch is a permutation of the whole
dataset drawn from (seed, epoch), global batch s holds positions s B .. (s + 1) B - 1 of that
endless sequence, and process p of P takes rows p B / P .. (p + 1) B / P - 1 of each global
batch. So the batches of a step depend on the step, the seed and the global batch size B, and
not on how many processes read them: a run resumes at its step on any number of hosts, and the
data position needs no checkpoint of its own.

Bad records (unreadable, undecodable images, images or latents of the wrong shape, non-finite
latents, empty or non-text captions) are never fatal: a position whose record is unusable takes
the next usable record of the same epoch's order instead (a choice that depends only on the
position, so it too is the same on any number of processes), and each batch counts the
records replaced in it.
"""

from __future__ import annotations

import dataclasses
import io
import sys

import grain
import numpy as np
from absl import flags
from PIL import Image

from ecdit_jax.data import batch as batch_keys
from ecdit_jax.data.latents import center_crop_resize
from ecdit_jax.data.tokenizer import Tokenizer

MAX_REPLACEMENTS = 1000  # bad records in a row before a position gives up


@dataclasses.dataclass(frozen=True)
class Skipped:
  """Stands in for a record that cannot be used (a class, so no record key can imitate it)."""

  reason: str


def decode_image(value, image_size: int, resize: bool = False) -> np.ndarray | None:
  """uint8 (S, S, 3) from an array, PIL image or encoded bytes; None if unusable.

  Encoded and PIL images of any colour mode are converted to RGB; arrays must already be
  uint8 RGB. Without ``resize`` an image of another size is a bad record; with it, any image is
  center-cropped to a square and resized to S (as ``ecdit_jax.precompute`` does).
  """
  if isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 0:
    value = value.item()
  try:
    if isinstance(value, (bytes, bytearray, memoryview)):
      with Image.open(io.BytesIO(bytes(value))) as pil_image:
        value = pil_image.convert("RGB")  # forces a full decode inside the try
    if isinstance(value, Image.Image):
      value = np.asarray(value.convert("RGB"))
    array = np.asarray(value)
  except Exception:  # noqa: BLE001 - truncated/corrupt encodings raise assorted errors.
    return None
  if resize and array.dtype == np.uint8 and array.ndim == 3 and array.shape[-1] == 3 \
      and min(array.shape[:2]) >= 1 and array.shape != (image_size, image_size, 3):
    array = center_crop_resize(array, image_size)
  if array.shape != (image_size, image_size, 3) or array.dtype != np.uint8:
    return None
  return array


def decode_latent(value, image_size: int, channels: int) -> np.ndarray | None:
  """float32 (S, S, channels) from a latent array; None if it has another shape, is not a float
  array, or holds NaN or infinity (a latent that would poison the loss)."""
  try:
    array = np.asarray(value)
  except Exception:  # noqa: BLE001 - objects that numpy cannot convert.
    return None
  if array.shape != (image_size, image_size, channels) or not np.issubdtype(array.dtype,
                                                                              np.floating):
    return None
  array = array.astype(np.float32)
  if not np.all(np.isfinite(array)):
    return None
  return array


def decode_text(value) -> str | None:
  """A stripped caption string, or None if the value is not usable text."""
  if isinstance(value, np.ndarray):
    if value.size != 1:
      return None
    value = value.reshape(()).item()
  if isinstance(value, (bytes, bytearray)):
    try:
      value = bytes(value).decode("utf-8")
    except UnicodeDecodeError:
      return None
  if not isinstance(value, str):
    return None
  value = value.strip()
  return value or None


def scale_pixels(pixels: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1], the model's input range."""
  return pixels.astype(np.float32) / 127.5 - 1.0


class Preprocess:
  """Record -> {IMAGE: float32, TOKENS: int32} or a ``Skipped`` marker (picklable).

  The image is pixels scaled to [-1, 1] (kept uint8 without ``scale``), or with
  ``latent_channels`` a latent taken as it is. With ``context_width`` the record's encoded
  caption (``"context"``, (n, width) states of its n valid tokens) replaces the tokens: the
  example holds CONTEXT (max_text_len, width), zero after the n states, and CONTEXT_LENGTHS n.
  """

  def __init__(self, tokenizer: Tokenizer | None, image_size, max_text_len, image_key, text_key,
               latent_channels: int | None = None, resize_images: bool = False,
               scale: bool = True, context_width: int | None = None):
    self._tokenizer = tokenizer
    self._context_width = context_width
    self._image_size = image_size
    self._max_text_len = max_text_len
    self._image_key = image_key
    self._text_key = text_key
    self._latent_channels = latent_channels
    self._resize_images = resize_images
    self._scale = scale

  def _image(self, value) -> np.ndarray | None:
    if self._latent_channels is not None:
      return decode_latent(value, self._image_size, self._latent_channels)
    image = decode_image(value, self._image_size, self._resize_images)
    return image if image is None or not self._scale else scale_pixels(image)

  def __call__(self, record):
    if not isinstance(record, dict):
      return Skipped(f"record is a {type(record).__name__}, not a dict")
    if self._image_key not in record or self._text_key not in record:
      return Skipped("missing image or text feature")
    image = self._image(record[self._image_key])
    if image is None:
      return Skipped("undecodable image, non-finite latent or wrong shape")
    text = decode_text(record[self._text_key])
    if text is None:
      return Skipped("empty or non-text caption")
    if self._context_width is not None:
      return self._with_context(image, record.get("context"))
    tokens = self._tokenizer.encode_batch([text], self._max_text_len)[0]
    return {batch_keys.IMAGE: image, batch_keys.TOKENS: tokens}

  def _with_context(self, image, states):
    states = None if states is None else np.asarray(states)
    if (states is None or states.ndim != 2 or states.shape[1] != self._context_width
        or not 1 <= states.shape[0] <= self._max_text_len
        or not np.all(np.isfinite(states.astype(np.float32)))):
      return Skipped("missing, misshapen or non-finite encoded caption")
    context = np.zeros((self._max_text_len, self._context_width), states.dtype)
    context[:len(states)] = states
    return {batch_keys.IMAGE: image, batch_keys.CONTEXT: context,
            batch_keys.CONTEXT_LENGTHS: np.int32(len(states))}


def _read(source, index: int):
  """The record at ``index``, or a Skipped marker when the source fails to read it."""
  try:
    return source[index]
  except Exception as error:  # noqa: BLE001 - any storage failure means "skip".
    return Skipped(f"read failed: {type(error).__name__}: {error}")


@dataclasses.dataclass(frozen=True)
class GlobalOrder:
  """Which record each position of the endless training sequence reads (see the module doc)."""

  num_records: int
  seed: int
  global_batch: int

  def __post_init__(self):
    if self.num_records < 1:
      raise ValueError("the dataset holds no records")

  def record(self, position: int) -> int:
    """Record index at ``position``: a per-epoch permutation keyed by (seed, epoch)."""
    epoch, index = divmod(position, self.num_records)
    return grain.experimental.index_shuffle(
        index, max_index=self.num_records - 1, seed=(self.seed + epoch) % 2**32, rounds=4)

  def positions(self, step: int, process_index: int, process_count: int) -> range:
    """The positions of this process's rows of global batch ``step``."""
    if self.global_batch % process_count:
      raise ValueError(f"the global batch of {self.global_batch} does not split over "
                       f"{process_count} processes")
    rows = self.global_batch // process_count
    first = step * self.global_batch + process_index * rows
    return range(first, first + rows)

  def replacement(self, position: int, attempt: int) -> int:
    """The record tried for ``position`` after ``attempt`` unusable ones: the next positions of
    the same epoch, cyclically."""
    epoch = position // self.num_records
    index = (position + attempt) % self.num_records
    return self.record(epoch * self.num_records + index)


class _ProcessBatches:
  """Random access to this process's batches: element s is its rows of global batch s."""

  def __init__(self, source, preprocess: Preprocess, order: GlobalOrder, process_index: int,
               process_count: int):
    self._source, self._preprocess, self._order = source, preprocess, order
    self._process = (process_index, process_count)

  def __len__(self) -> int:
    return sys.maxsize  # endless: steps run until the training loop stops

  def _example(self, position: int) -> tuple[dict, int]:
    for attempt in range(min(MAX_REPLACEMENTS, self._order.num_records)):
      index = self._order.replacement(position, attempt)
      record = _read(self._source, index)
      example = record if isinstance(record, Skipped) else self._preprocess(record)
      if not isinstance(example, Skipped):
        return example, attempt
    raise RuntimeError(f"{attempt + 1} consecutive unusable records from position {position}; "
                       f"last: {example.reason}")

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    examples, replaced = [], 0
    for position in self._order.positions(step, *self._process):
      example, attempts = self._example(position)
      examples.append(example)
      replaced += attempts
    out = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
    out[batch_keys.NUM_SKIPPED] = np.int32(replaced)
    return out


def make_batches(source, preprocess: Preprocess, *, order: GlobalOrder, process_index: int,
                 process_count: int, start_step: int = 0, worker_count: int = 0,
                 read_threads: int = 4):
  """This process's batches from global step ``start_step`` on: {IMAGE, TOKENS, NUM_SKIPPED}.

  ``worker_count > 0`` decodes in that many worker processes (whole batches each, handed back
  in step order), ``read_threads`` batches at a time otherwise; either way the batches are the
  same. Close the iterator (``close()``) to stop the workers.
  """
  dataset = grain.MapDataset.source(
      _ProcessBatches(source, preprocess, order, process_index, process_count))[start_step:]
  batches = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads))
  if worker_count > 0:
    # grain's worker processes read absl flags; outside absl.app.run (tests, notebooks) they
    # are unparsed, and reading them would raise. Defaults are what we want there.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(batches)


def read_in_order(source, preprocess: Preprocess, *, shard_index: int = 0, shard_count: int = 1,
                  chunk: int = 1024):
  """One pass over the records ``shard_index::shard_count`` in order, as (usable examples of
  the next ``chunk`` records stacked, records skipped among them), for caches and evaluations.
  Chunks may hold fewer examples, or none."""
  indices = range(shard_index, len(source), shard_count)
  for start in range(0, len(indices), chunk):
    examples, skipped = [], 0
    for index in indices[start:start + chunk]:
      record = _read(source, index)
      example = record if isinstance(record, Skipped) else preprocess(record)
      if isinstance(example, Skipped):
        skipped += 1
      else:
        examples.append(example)
    stacked = ({key: np.stack([e[key] for e in examples]) for key in examples[0]}
               if examples else {})
    yield stacked, skipped


def read_captions(data_source, text_key: str = "caption") -> list[str]:
  """All usable captions of a data source, in record order (e.g. to train the tokenizer).

  Reads whole records, images included; meant for datasets of modest size.
  """
  captions = []
  for index in range(len(data_source)):
    record = _read(data_source, index)
    if isinstance(record, dict):
      text = decode_text(record.get(text_key))
      if text is not None:
        captions.append(text)
  return captions

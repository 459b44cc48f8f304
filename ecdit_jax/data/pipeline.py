"""grain input pipeline: random-access source -> shard -> shuffle -> decode + tokenize -> batch.

Works with any random-access source of dict records holding an image and a caption (a TFDS
``data_source``, ``builder.as_data_source(split)``, or any object with ``__len__``/``__getitem__``).
The image is either pixels (uint8 RGB, scaled to [-1, 1] here) or precomputed VAE latents
(float32 (S, S, C), already scaled by the VAE's factor: a ``data.latents.LatentSource``).
Each JAX process reads a disjoint, strided shard of the records. The batch iterator is a
``grain.DatasetIterator`` so its position can be checkpointed with ``get_state``/``set_state``
(or grain's Orbax handler) and a resumed run sees exactly the batches an uninterrupted run would.

Bad records (unreadable, undecodable images, images or latents of the wrong shape, non-finite
latents, empty or non-text captions) are skipped, never fatal; each batch reports how many were
skipped while filling it.
"""

from __future__ import annotations

import dataclasses
import io
import logging

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from ecdit_jax.data.latents import center_crop_resize
from ecdit_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Skipped:
  """Stands in for a record that cannot be used (a class, so no record key can imitate it)."""

  reason: str


class _SkipOnErrorSource:
  """Wraps a data source so that a record that cannot be read becomes a skip marker."""

  def __init__(self, data_source):
    self._source = data_source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    try:
      return self._source[index]
    except Exception as error:  # noqa: BLE001 - any storage/decoding failure means "skip".
      return Skipped(f"read failed: {type(error).__name__}: {error}")


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


class _PreprocessRecord:
  """Record -> {'image': float32, 'tokens': int32} or a skip marker (picklable).

  The image is pixels scaled to [-1, 1] (kept uint8 without ``scale``), or with
  ``latent_channels`` a latent taken as it is.
  """

  def __init__(self, tokenizer: Tokenizer, image_size, max_text_len, image_key, text_key,
               latent_channels: int | None = None, resize_images: bool = False,
               scale: bool = True):
    self._tokenizer = tokenizer
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
    if isinstance(record, Skipped):
      return record
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
    tokens = self._tokenizer.encode_batch([text], self._max_text_len)[0]
    return {"image": image, "tokens": tokens}


class SkipCountingBatchIterator(grain.DatasetIterator):
  """Stacks ``batch_size`` valid elements per batch and counts the records skipped on the way.

  A batch is only returned once it is full, so between batches nothing is buffered here and the
  parent iterator's state alone pins the position: get_state/set_state simply delegate to it.
  """

  def __init__(self, parent, batch_size: int, drop_remainder: bool, max_consecutive_skips: int):
    super().__init__(parent)
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder
    # Guards an endless loop on a repeated source in which no record is usable.
    self._max_consecutive_skips = max_consecutive_skips

  def __next__(self) -> dict[str, np.ndarray]:
    images, tokens = [], []
    num_skipped = consecutive_skips = 0
    while len(images) < self._batch_size:
      try:
        element = next(self._parent)
      except StopIteration:
        if images and not self._drop_remainder:
          break
        raise
      if isinstance(element, Skipped):
        num_skipped += 1
        consecutive_skips += 1
        logging.debug("skipping record: %s", element.reason)
        if consecutive_skips > self._max_consecutive_skips:
          raise RuntimeError(
            f"{consecutive_skips} consecutive unusable records; last: {element.reason}"
          )
        continue
      consecutive_skips = 0
      images.append(element["image"])
      tokens.append(element["tokens"])
    return {
      "image": np.stack(images),
      "tokens": np.stack(tokens),
      "num_skipped": np.int32(num_skipped),
    }

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class SkipCountingBatch(grain.IterDataset):
  """The dataset of ``SkipCountingBatchIterator`` batches.

  A dataset rather than only an iterator so that worker processes (``mp_prefetch``) build whole
  batches: handing each record to the main process separately costs more than decoding it.
  """

  def __init__(self, parent: grain.IterDataset, batch_size: int, drop_remainder: bool,
               max_consecutive_skips: int):
    super().__init__(parent)
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder
    self._max_consecutive_skips = max_consecutive_skips

  def __iter__(self) -> SkipCountingBatchIterator:
    return SkipCountingBatchIterator(iter(self._parent), self._batch_size, self._drop_remainder,
                                     self._max_consecutive_skips)


def process_shard() -> tuple[int, int]:
  """(index, count) of this process's shard of a dataset: one shard per JAX process."""
  return jax.process_index(), jax.process_count()


def make_dataset_iterator(
  data_source,
  *,
  tokenizer: Tokenizer,
  batch_size: int,
  image_size: int,
  max_text_len: int,
  seed: int,
  image_key: str = "image",
  text_key: str = "caption",
  shuffle: bool = True,
  num_epochs: int | None = None,
  worker_count: int = 0,
  drop_remainder: bool = True,
  read_threads: int = 4,
  shard_index: int | None = None,
  shard_count: int | None = None,
  latent_channels: int | None = None,
  resize_images: bool = False,
  scale_images: bool = True,
) -> grain.DatasetIterator:
  """Batches of this process's shard: {'image' (B,H,W,C) f32 in [-1,1], 'tokens' (B,L) i32,
  'num_skipped' i32}.

  ``latent_channels`` reads the image feature as float latents of shape (image_size,
  image_size, latent_channels), unscaled; None reads uint8 RGB pixels, which ``resize_images``
  center-crops and resizes to image_size (else other sizes are bad records), and
  ``scale_images=False`` leaves as uint8 instead of scaling to [-1, 1]. ``tokenizer`` is any
  object with ``encode_batch(texts, max_len) -> int32 (N, max_len)``.

  ``batch_size`` is per process. ``num_epochs=None`` repeats forever (training), 1 is a single
  pass (eval). Each epoch is shuffled differently but deterministically from ``seed``.
  ``worker_count > 0`` decodes and batches in that many worker processes (worker w takes
  records w, w + n, ... of the shuffled shard, so batches hold other records than with no
  workers, equally deterministic); resume a checkpointed state with the same ``worker_count``.
  ``shard_index``/``shard_count`` default to the JAX process index/count. Shards are strided (record ``i`` goes to shard ``i % shard_count``), so their
  sizes differ by at most one record; in a one-pass multi-process eval the shards may therefore
  yield different numbers of batches.
  """
  if batch_size < 1 or max_text_len < 1:
    raise ValueError("batch_size and max_text_len must be positive")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None or positive, got {num_epochs}")
  if (shard_index is None) != (shard_count is None):
    raise ValueError("give both shard_index and shard_count, or neither")
  if shard_index is None:
    shard_index, shard_count = process_shard()
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} out of range for {shard_count} shards")

  dataset = grain.MapDataset.source(_SkipOnErrorSource(data_source))
  # Shard before shuffling so that the shards stay disjoint in every epoch.
  dataset = dataset[shard_index::shard_count]
  shard_len = len(dataset)
  if shard_len == 0:
    raise ValueError(f"shard {shard_index} of {shard_count} is empty ({len(data_source)} records)")
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  if num_epochs != 1:
    dataset = dataset.repeat(num_epochs)
  dataset = dataset.map(_PreprocessRecord(tokenizer, image_size, max_text_len, image_key, text_key,
                                          latent_channels, resize_images, scale_images))
  iter_dataset = dataset.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * batch_size, 16))
  )
  # Unusable records at the end of one epoch and the start of the next can run together, so
  # only more than two shards' worth in a row proves that the shard has no usable record.
  batches = SkipCountingBatch(iter_dataset, batch_size, drop_remainder,
                              max_consecutive_skips=2 * shard_len)
  if worker_count > 0:
    # grain's worker processes read absl flags; outside absl.app.run (tests, notebooks) they
    # are unparsed, and reading them would raise. Defaults are what we want there.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    # Worker w batches records w, w + n, ... of the shuffled shard; batches come round-robin.
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(batches)


def read_captions(data_source, text_key: str = "caption") -> list[str]:
  """All usable captions of a data source, in record order (e.g. to train the tokenizer).

  Reads whole records, images included; meant for datasets of modest size.
  """
  captions = []
  source = _SkipOnErrorSource(data_source)
  for index in range(len(source)):
    record = source[index]
    if isinstance(record, dict):
      text = decode_text(record.get(text_key))
      if text is not None:
        captions.append(text)
  return captions

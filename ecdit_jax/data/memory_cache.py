"""A dataset decoded once into host memory, and shuffled batches served from it.

Decoding, resizing and tokenizing a record costs far more than training on it when the model is
small: one process prepares about 2,600 GenEval-Shapes records a second, while the default
model trains on tens of thousands of images a second on one GPU. A dataset that fits in host
memory (GenEval-Shapes' 20,000 images of 32x32 take 61 MB) is therefore decoded in one pass
through the grain pipeline, with the same checks (bad records are skipped and counted), and then
every batch is a gather from arrays.

Pixels stay uint8 in memory (four times smaller than float32) and are scaled per batch, with
the same arithmetic as the pipeline, so the images are bit for bit those the pipeline yields.
Latents are kept as float32.

The batch iterator is a ``grain.DatasetIterator``: its position (epoch, batch) is a small JSON
state that the training checkpoint stores and restores like the pipeline's.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import grain
import numpy as np

from ecdit_jax.data import pipeline

_LOG = logging.getLogger(__name__)
_DECODE_CHUNK = 1024  # records per pipeline batch in the decoding pass


@dataclasses.dataclass(frozen=True)
class DecodedRecords:
  """The usable records of one shard, in record order."""

  images: np.ndarray  # uint8 (N, S, S, 3) pixels, or float32 (N, S, S, C) latents
  tokens: np.ndarray  # int32 (N, L)
  num_skipped: int  # records of the shard that could not be used

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def nbytes(self) -> int:
    return self.images.nbytes + self.tokens.nbytes

  def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    images = self.images[indices]
    if images.dtype == np.uint8:
      images = pipeline.scale_pixels(images)
    return {"image": images, "tokens": self.tokens[indices]}


def decode_all(data_source, *, tokenizer, image_size: int, max_text_len: int,
               image_key: str = "image", text_key: str = "caption",
               latent_channels: int | None = None, resize_images: bool = False,
               shard_index: int | None = None, shard_count: int | None = None) -> DecodedRecords:
  """Every usable record of this process's shard (as ``pipeline.make_dataset_iterator`` shards,
  checks and tokenizes them), decoded in one pass in the main process, so that the order does
  not depend on any worker count."""
  start = time.time()
  if shard_index is None and shard_count is None:
    shard_index, shard_count = pipeline.process_shard()
  iterator = pipeline.make_dataset_iterator(
      data_source, tokenizer=tokenizer, batch_size=_DECODE_CHUNK, image_size=image_size,
      max_text_len=max_text_len, seed=0, image_key=image_key, text_key=text_key, shuffle=False,
      num_epochs=1, drop_remainder=False, shard_index=shard_index, shard_count=shard_count,
      latent_channels=latent_channels, resize_images=resize_images, scale_images=False)
  chunks = list(iterator)
  shard_len = len(range(shard_index, len(data_source), shard_count))
  if not chunks:
    raise ValueError(f"no usable record among the {shard_len} of this process's shard")
  images = np.concatenate([chunk["image"] for chunk in chunks])
  tokens = np.concatenate([chunk["tokens"] for chunk in chunks])
  # Counted from the shard's size: bad records after the last good one end the pass unreported.
  records = DecodedRecords(images, tokens, shard_len - len(tokens))
  _LOG.info("decoded %d records into memory (%.1f MB, %d skipped) in %.1f s", len(records),
               records.nbytes / 1e6, records.num_skipped, time.time() - start)
  return records


class CachedBatchIterator(grain.DatasetIterator):
  """Endless batches of ``batch_size`` records, each epoch a new permutation drawn from
  (seed, epoch); the records an epoch's last partial batch would hold are left out of that
  epoch only. Batches carry 'num_skipped': the records skipped while decoding, reported once,
  in this iterator's first batch."""

  def __init__(self, records: DecodedRecords, batch_size: int, seed: int):
    super().__init__()
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(records) < batch_size:
      raise ValueError(f"{len(records)} usable records in memory cannot fill a batch of "
                       f"{batch_size}")
    self._records = records
    self._batch_size = batch_size
    self._seed = seed
    self._batches_per_epoch = len(records) // batch_size
    self._epoch = 0
    self._batch = 0
    self._order = None  # the permutation of self._epoch, drawn when first needed
    self._unreported_skips = records.num_skipped

  def _permutation(self) -> np.ndarray:
    if self._order is None:
      self._order = np.random.default_rng([self._seed, self._epoch]).permutation(
          len(self._records))
    return self._order

  def __next__(self) -> dict[str, np.ndarray]:
    if self._batch == self._batches_per_epoch:
      self._epoch, self._batch, self._order = self._epoch + 1, 0, None
    start = self._batch * self._batch_size
    batch = self._records.batch(self._permutation()[start:start + self._batch_size])
    self._batch += 1
    batch["num_skipped"] = np.int32(self._unreported_skips)
    self._unreported_skips = 0
    return batch

  def get_state(self) -> dict:
    # The sizes travel with the position: a position means nothing for another dataset or batch.
    return {"epoch": self._epoch, "batch": self._batch, "num_records": len(self._records),
            "batch_size": self._batch_size, "seed": self._seed}

  def set_state(self, state: dict) -> None:
    if "num_records" not in state:
      raise ValueError("the saved data position is the streaming pipeline's: resume with "
                       "config.data.cache_in_memory=False, as the run was started")
    expected = {"num_records": len(self._records), "batch_size": self._batch_size,
                "seed": self._seed}
    found = {key: state.get(key) for key in expected}
    if found != expected:
      raise ValueError(f"the saved data position was taken with {found}, but this run has "
                       f"{expected}: resume with the same dataset, batch size and seed")
    self._epoch, self._batch, self._order = int(state["epoch"]), int(state["batch"]), None

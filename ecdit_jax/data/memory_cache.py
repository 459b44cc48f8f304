"""A dataset decoded once into host memory, and batches served from it in the global order.

Decoding, resizing and tokenizing a record costs far more than training on it when the model is
small: one process prepares a few thousand GenEval-Shapes records a second, while the default
model trains on tens of thousands of images a second on one GPU. A dataset that fits in host
memory (GenEval-Shapes' 20,000 images of 32x32 take 61 MB) is therefore decoded in one pass,
with the same checks (bad records are left out and counted), and then every batch is a gather
from arrays. Every process decodes the whole dataset, so that the order of batches is
``pipeline.GlobalOrder`` over the usable records, whatever the number of processes.

Pixels stay uint8 in memory (four times smaller than float32) and are scaled per batch, with
the same arithmetic as the pipeline, so the images are bit for bit those the pipeline yields.
Latents are kept as float32.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ecdit_jax.data import batch as batch_keys
from ecdit_jax.data import pipeline


@dataclasses.dataclass(frozen=True)
class DecodedRecords:
  """The usable records of a dataset, in record order: one array per batch key (IMAGE as
  uint8 (N, S, S, 3) pixels or float32 latents; TOKENS, or CONTEXT and CONTEXT_LENGTHS)."""

  arrays: dict[str, np.ndarray]
  num_skipped: int  # records that could not be used

  def __len__(self) -> int:
    return len(self.arrays[batch_keys.IMAGE])

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in self.arrays.values())

  def batch(self, indices) -> dict[str, np.ndarray]:
    batch = {key: array[np.asarray(indices)] for key, array in self.arrays.items()}
    if batch[batch_keys.IMAGE].dtype == np.uint8:
      batch[batch_keys.IMAGE] = pipeline.scale_pixels(batch[batch_keys.IMAGE])
    return batch


def decode_all(data_source, preprocess: pipeline.Preprocess) -> DecodedRecords:
  """Every usable record, decoded in one pass in record order. ``preprocess`` must keep pixels
  as uint8 (``scale=False``)."""
  chunks, skipped = [], 0
  for chunk, chunk_skipped in pipeline.read_in_order(data_source, preprocess):
    skipped += chunk_skipped
    if chunk:
      chunks.append(chunk)
  if not chunks:
    raise ValueError(f"no usable record among the {len(data_source)} of the dataset")
  return DecodedRecords({key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]},
                        skipped)


class CachedBatches:
  """This process's rows of every global batch from ``start_step`` on, drawn from memory in
  ``GlobalOrder(len(records), seed, global_batch)``. The first batch carries the records
  skipped while decoding (``NUM_SKIPPED``); later ones carry 0."""

  def __init__(self, records: DecodedRecords, *, global_batch: int, seed: int,
               process_index: int, process_count: int, start_step: int = 0):
    if len(records) < global_batch // process_count:
      raise ValueError(f"{len(records)} usable records in memory cannot fill a batch of "
                       f"{global_batch // process_count}")
    self._records = records
    self._order = pipeline.GlobalOrder(len(records), seed, global_batch)
    self._process = (process_index, process_count)
    self._step = start_step
    self._unreported_skips = records.num_skipped

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    positions = self._order.positions(self._step, *self._process)
    batch = self._records.batch([self._order.record(p) for p in positions])
    batch[batch_keys.NUM_SKIPPED] = np.int32(self._unreported_skips)
    self._step, self._unreported_skips = self._step + 1, 0
    return batch

  def close(self) -> None:
    pass

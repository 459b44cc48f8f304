"""Sources of records for the data tests: each image's pixels spell out its record's index."""

import io

import numpy as np
from PIL import Image

SIZE, MAX_LEN = 16, 12
WORDS = ("a circle", "two squares", "a red triangle", "a blue circle above a square")


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _indexed_image(index):
  """A 16x16 image whose pixels spell out ``index`` so a batch row can be traced to its record."""
  image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
  image[..., 0] = index % 256
  image[..., 1] = index // 256
  return image


class IndexedSource:
  """In-memory random-access source: record i has an index-coded image and caption WORDS[i % 4]."""

  def __init__(self, size, encode_every=3):
    self._size, self._encode_every = size, encode_every

  def __len__(self):
    return self._size

  def __getitem__(self, index):
    image = _indexed_image(index)
    # Mix raw arrays and PNG bytes: both forms occur in real sources.
    image = _png(image) if index % self._encode_every == 0 else image
    return {"image": image, "caption": WORDS[index % len(WORDS)].encode()}


class PlantedBadSource:
  """Good records (images 0..5) interleaved with one of each kind of bad record."""

  def __init__(self):
    def good(i):
      return {"image": _indexed_image(i), "caption": WORDS[i % 4]}

    truncated_png = _png(_indexed_image(99))[:40]
    self.records = [
      good(0),
      {"image": b"definitely not a png", "caption": "a circle"},  # undecodable
      good(1),
      good(2),
      {"image": _indexed_image(98), "caption": ""},  # empty caption
      {"image": _indexed_image(97), "caption": "   \n"},  # whitespace caption
      good(3),
      {"image": np.zeros((8, 8, 3), np.uint8), "caption": "a circle"},  # wrong size
      {"image": np.zeros((SIZE, SIZE), np.uint8), "caption": "a circle"},  # no channels
      {"image": truncated_png, "caption": "a circle"},  # truncated encoding
      "unreadable",  # __getitem__ raises
      {"caption": "a circle"},  # missing image
      good(4),
      good(5),
    ]

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    record = self.records[index]
    if isinstance(record, str):
      raise OSError("storage failure")
    return record


def record_ids(batch):
  """Record index of each batch row, read back from the index-coded pixels."""
  pixels = np.rint((batch["image"][:, 0, 0, :2] + 1.0) * 127.5).astype(int)
  return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()



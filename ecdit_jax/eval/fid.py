"""Fréchet Inception Distance: streaming feature statistics, reference statistics, the distance.

FID compares the Gaussian fitted to the Inception pool3 features of generated images with that of
real images. Statistics are accumulated batch by batch (``FeatureStats``), so neither set of
images nor their features has to fit in memory; they are saved as ``.npz`` with ``mu`` and
``sigma`` entries, the layout of pytorch-fid's statistics files, so either side can be
precomputed by either tool. Any feature function works here; the FID one is
``inception.make_feature_fn(inception.load_fid_inception(path))``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from ecdit_jax.fileio import write_atomic

FeatureFn = Callable[[np.ndarray], np.ndarray]


class FeatureStats:
  """Running mean and covariance of feature vectors, accumulated in float64.

  Sums are taken around a fixed shift (the mean of the first batch), which keeps the
  sum-of-outer-products formula accurate when features have a large common offset.
  """

  def __init__(self):
    self.count = 0
    self._shift: np.ndarray | None = None
    self._sum: np.ndarray | None = None
    self._outer_sum: np.ndarray | None = None

  @property
  def dim(self) -> int | None:
    return None if self._shift is None else self._shift.shape[0]

  def update(self, features) -> None:
    """Adds a (N, D) batch of features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
      raise ValueError(f"features must be (N, D), got shape {features.shape}")
    if features.shape[0] == 0:
      return
    if self._shift is None:
      self._shift = features.mean(axis=0)
      self._sum = np.zeros_like(self._shift)
      self._outer_sum = np.zeros((self._shift.shape[0],) * 2)
    elif features.shape[1] != self.dim:
      raise ValueError(f"features of dimension {features.shape[1]}, expected {self.dim}")
    centred = features - self._shift
    self._sum += centred.sum(axis=0)
    self._outer_sum += centred.T @ centred
    self.count += features.shape[0]

  def mean_and_cov(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)): the sample mean and unbiased covariance (like ``np.cov``)."""
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
    centred_mean = self._sum / self.count
    cov = (self._outer_sum - self.count * np.outer(centred_mean, centred_mean)) / (self.count - 1)
    # Exactly symmetric, whatever the rounding of the accumulation.
    return self._shift + centred_mean, (cov + cov.T) / 2

  def save(self, path: str | os.PathLike) -> None:
    """Writes ``mu``, ``sigma`` and ``count`` to an ``.npz`` file, whole or not at all."""
    mu, sigma = self.mean_and_cov()
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma, count=np.int64(self.count))
    write_atomic(path, buffer.getvalue())

  @classmethod
  def load(cls, path: str | os.PathLike) -> FeatureStats:
    """Statistics saved by ``save``, ready for more ``update``s.

    Needs the ``count`` entry; files holding only ``mu`` and ``sigma`` (such as pytorch-fid's)
    are read with ``load_stats``.
    """
    with np.load(io.BytesIO(epath.Path(path).read_bytes())) as data:
      if "count" not in data:
        raise ValueError(f"{os.fspath(path)} has no 'count' entry, so it cannot be extended; "
                         "use load_stats to read its mu and sigma")
      mu, sigma, count = data["mu"], data["sigma"], int(data["count"])
    stats = cls()
    # Shifting by mu makes the centred sum zero and the centred outer sum (n - 1) * sigma.
    stats.count = count
    stats._shift = mu.astype(np.float64)
    stats._sum = np.zeros_like(stats._shift)
    stats._outer_sum = sigma.astype(np.float64) * (count - 1)
    return stats


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) from an ``.npz`` statistics file (``FeatureStats.save`` or pytorch-fid)."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no FID statistics file at {os.fspath(path)}")
  with np.load(io.BytesIO(path.read_bytes())) as data:
    missing = [key for key in ("mu", "sigma") if key not in data]
    if missing:
      raise ValueError(f"{os.fspath(path)} lacks {missing}: not an FID statistics file")
    return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
  eigenvalues, eigenvectors = np.linalg.eigh(matrix)
  # Covariances are positive semi-definite; rounding can leave eigenvalues slightly below 0.
  roots = np.sqrt(np.clip(eigenvalues, 0.0, None))
  return (eigenvectors * roots) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)). The trace term is
  computed as the sum of square roots of the eigenvalues of sqrt(sigma1) sigma2 sqrt(sigma1),
  which has the same eigenvalues as sigma1 sigma2 but is symmetric: two real symmetric
  eigendecompositions replace a general (possibly complex) matrix square root.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  dim = mu1.shape[0]
  if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or (
      sigma2.shape != (dim, dim)):
    raise ValueError(f"mismatched statistics: mu {mu1.shape} and {mu2.shape}, "
                     f"sigma {sigma1.shape} and {sigma2.shape}")
  sqrt_sigma1 = _symmetric_sqrt(sigma1)
  product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
  eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
  trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def features_from_images(feature_fn: FeatureFn, image_batches: Iterable,
                         stats: FeatureStats | None = None) -> FeatureStats:
  """Accumulates ``feature_fn`` of each (B, H, W, 3) batch; into ``stats`` if given."""
  stats = FeatureStats() if stats is None else stats
  for batch in image_batches:
    stats.update(feature_fn(batch))
  return stats


def as_rgb_uint8(image) -> np.ndarray:
  """A dataset image (encoded bytes, or an (H, W[, 1|3|4]) array) as (H, W, 3) uint8."""
  if isinstance(image, (bytes, bytearray)):
    with Image.open(io.BytesIO(image)) as decoded:
      return np.asarray(decoded.convert("RGB"))
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected uint8 images, got {image.dtype}")
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an (H, W, C) image with 1, 3 or 4 channels, got {image.shape}")
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return image[:, :, :3]  # alpha does not take part in FID


def _same_size_groups(images: list[np.ndarray]) -> Iterable[np.ndarray]:
  """Stacks of the images that share a size (datasets may mix sizes; the network resizes)."""
  by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
  for image in images:
    by_shape.setdefault(image.shape, []).append(image)
  return [np.stack(group) for group in by_shape.values()]


def stats_from_source(feature_fn: FeatureFn, source, *, image_key: str = "image",
                      batch_size: int = 50, max_images: int | None = None) -> FeatureStats:
  """Statistics of the images of a random-access source (records with ``image_key``).

  Reads records in order, the first ``max_images`` of them if given, ``batch_size`` at a time:
  only one batch of images is held at once.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  total = len(source) if max_images is None else min(len(source), max_images)
  stats = FeatureStats()
  for start in range(0, total, batch_size):
    images = []
    for index in range(start, min(start + batch_size, total)):
      record = source[index]
      if image_key not in record:
        raise KeyError(f"record {index} has no {image_key!r} entry; it has {sorted(record)}")
      images.append(as_rgb_uint8(record[image_key]))
    for group in _same_size_groups(images):
      stats.update(feature_fn(group))
  return stats


def reference_stats_from_tfds(feature_fn: FeatureFn, name: str, split: str,
                              data_dir: str | os.PathLike | None = None, *,
                              image_key: str = "image", batch_size: int = 50,
                              max_images: int | None = None) -> FeatureStats:
  """Statistics of a prepared TFDS dataset's images, read with ``tfds.data_source``.

  ``name`` may carry a config and version (``"geneval_shapes/s32_train40_test8_seed0"``). The
  dataset must already be prepared under ``data_dir`` in a random-access format (ArrayRecord);
  nothing is downloaded or generated and TensorFlow is not needed.
  """
  data_dir = None if data_dir is None else os.fspath(data_dir)
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  return stats_from_source(feature_fn, source, image_key=image_key, batch_size=batch_size,
                           max_images=max_images)

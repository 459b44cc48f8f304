"""TFDS builder for GenEval-Shapes, generated locally and written as ArrayRecord without TensorFlow.

Nothing is downloaded: the records come from ``geneval_shapes`` for a seed. Each combination of
image size, seed and split sizes gets its own BuilderConfig (and so its own directory under
``data_dir``), so datasets of different settings never collide in one cache.

Images are handed to TFDS as PNG bytes (encoded with PIL): TFDS encodes numpy images with
TensorFlow, which this project never requires. Records are written in key order
(``disable_shuffling``), so record ``i`` of a split is example ``i`` of that split's stream and the
readers' own seeded shuffle is the only shuffle.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from ecdit_jax.data import geneval_shapes

DATASET_NAME = "geneval_shapes"  # the TFDS name: tfds.data_source(f"{DATASET_NAME}/{config name}")
FILE_FORMAT = "array_record"
# Streams of geneval_shapes.example_rng: the test split never repeats a training example.
SPLIT_STREAMS = {"train": 0, "test": 1}
# zlib level is fixed so that the stored bytes do not depend on PIL's default.
_PNG_COMPRESS_LEVEL = 6


@dataclasses.dataclass(kw_only=True)
class GenevalShapesConfig(tfds.core.BuilderConfig):
  """Generation settings; the config name encodes all of them."""

  image_size: int = 32
  num_train: int = 20_000
  num_test: int = 1_000
  seed: int = 0


def config_name(image_size: int, num_train: int, num_test: int, seed: int) -> str:
  """Directory-safe name that differs whenever any generation setting differs."""
  return f"s{image_size}_train{num_train}_test{num_test}_seed{seed}"


def make_config(
  *, image_size: int = 32, num_train: int, num_test: int, seed: int = 0
) -> GenevalShapesConfig:
  """A BuilderConfig for these settings (created on the fly, not registered in the class)."""
  for field_name, value in (("num_train", num_train), ("num_test", num_test), ("seed", seed)):
    if value < 0:
      raise ValueError(f"{field_name} must be non-negative, got {value}")
  return GenevalShapesConfig(
    name=config_name(image_size, num_train, num_test, seed),
    description=f"{image_size}px GenEval-Shapes, seed {seed}",
    image_size=image_size,
    num_train=num_train,
    num_test=num_test,
    seed=seed,
  )


def encode_png(image: np.ndarray) -> bytes:
  """Lossless PNG bytes of a uint8 RGB image, deterministic for the same pixels."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, dtype=np.uint8), mode="RGB").save(
    buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL
  )
  return buffer.getvalue()


class GenevalShapes(tfds.core.GeneratorBasedBuilder):
  """GenEval-Shapes: coloured shapes with GenEval-style compositional captions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  # TFDS derives the builder's code path through the `importlib_resources` backport, which it
  # does not declare as a dependency on Python >= 3.9 (tensorflow/datasets#11212). The path only
  # locates a download-checksums file, and this builder downloads nothing.
  code_path = epath.Path(__file__)

  def __init__(self, *, config: GenevalShapesConfig, **kwargs):
    # The config is mandatory: there is no sensible default size/seed to cache implicitly.
    kwargs.setdefault("file_format", FILE_FORMAT)
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(
            shape=(size, size, 3), dtype=np.uint8, encoding_format="png"
          ),
          "caption": tfds.features.Text(),
          "category": tfds.features.ClassLabel(names=geneval_shapes.CATEGORIES),
          # Position of the example in its split's stream, for tracing a record back.
          "index": tfds.features.Scalar(dtype=np.int64),
        }
      ),
      supervised_keys=None,
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    return {
      "train": self._generate_examples("train", config.num_train),
      "test": self._generate_examples("test", config.num_test),
    }

  def _generate_examples(self, split: str, num_examples: int):
    config = self.builder_config
    stream = SPLIT_STREAMS[split]
    for index in range(num_examples):
      example = geneval_shapes.generate_example_at(config.seed, index, config.image_size, stream)
      # Integer keys: with disable_shuffling the records are stored sorted by key.
      yield (
        index,
        {
          "image": encode_png(example.image),
          "caption": example.caption,
          "category": example.category,
          "index": index,
        },
      )


def make_builder(
  data_dir: str | os.PathLike, *, image_size: int = 32, num_train: int, num_test: int, seed: int = 0
) -> GenevalShapes:
  """The builder for these settings (not prepared yet; see ``prepare``)."""
  config = make_config(image_size=image_size, num_train=num_train, num_test=num_test, seed=seed)
  # A builder of a dataset not yet on disk looks for its metadata in TFDS's public bucket, and
  # TFDS leaves the empty temporary directory it made for it behind: lend it one we remove.
  with tempfile.TemporaryDirectory() as scratch:
    previous, tempfile.tempdir = tempfile.tempdir, scratch
    try:
      return GenevalShapes(config=config, data_dir=os.fspath(data_dir))
    finally:
      tempfile.tempdir = previous


def prepare(
  data_dir: str | os.PathLike, *, image_size: int = 32, num_train: int, num_test: int, seed: int = 0
) -> tfds.core.DatasetBuilder:
  """Generates and writes the dataset once; later calls reuse what is already on disk.

  Use ``builder.as_data_source("train")`` for random access without TensorFlow.
  """
  builder = make_builder(
    data_dir, image_size=image_size, num_train=num_train, num_test=num_test, seed=seed
  )
  if not builder.is_prepared():
    print(f"generating GenEval-Shapes ({num_train} + {num_test} images of {image_size} px) "
          f"under {data_dir}; later runs reuse it", flush=True)
  tfds.disable_progress_bar()  # bars fill redirected logs with escape codes
  try:
    builder.download_and_prepare(
      file_format=FILE_FORMAT,
      download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
  except FileExistsError:
    # Several processes sharing a data_dir generate at once; the first to finish wins and the
    # others, having written the same bytes, use its copy.
    builder = make_builder(
      data_dir, image_size=image_size, num_train=num_train, num_test=num_test, seed=seed
    )
    if not builder.is_prepared():
      raise
  return builder

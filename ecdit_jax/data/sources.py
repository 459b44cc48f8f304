"""Random-access sources of image-text records, by ``config.data.dataset``.

"geneval_shapes" is generated under the data directory on first use; any other name is a
prepared TFDS image-text dataset (ArrayRecord); "latents:DIR" holds precomputed VAE latents
(one split, read whole for training).
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from ecdit_jax.data import geneval_shapes_tfds, latents
from ecdit_jax.errors import ConfigError


def open_source(data, split: str, *, image_size: int):
  """The source of ``split`` for ``data`` (a ``config.data``: dataset, latent_dir, tfds_dir,
  and GenEval-Shapes' num_train, num_test, generator_seed); ``image_size`` is GenEval-Shapes'
  resolution."""
  if data.latent_dir is not None:
    if split != "train":
      raise ValueError(f"config.data.dataset={data.dataset!r} has one split, read whole for "
                       f"training; there is no {split!r} split")
    return latents.LatentSource(data.latent_dir)
  if data.dataset == "geneval_shapes":
    builder = geneval_shapes_tfds.prepare(
        data.tfds_dir, image_size=image_size, num_train=data.num_train,
        num_test=data.num_test, seed=data.generator_seed)
    return builder.as_data_source(split)
  try:
    return tfds.data_source(data.dataset, split=split, data_dir=data.tfds_dir)
  except Exception as error:  # noqa: BLE001 - tfds raises assorted errors for a missing dataset
    raise ConfigError(
        f"config.data.dataset={data.dataset!r}: no prepared TFDS dataset with a {split!r} split "
        f"of that name under config.data.data_dir={data.tfds_dir!r} "
        f"({type(error).__name__}); prepare it there first, or check the name") from error

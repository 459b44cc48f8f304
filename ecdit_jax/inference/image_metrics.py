"""FID and CLIP score of a trained run: sample from reference captions, compare with real images.

The reference is an image-text dataset read with ``tfds.data_source`` (by default the run's own
dataset, test split). Its first ``num_images`` records give both the captions to generate from
and the real images whose Inception statistics FID compares against; those statistics can be
cached in an ``.npz`` file (pytorch-fid's layout) and are then read instead of recomputed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ecdit_jax.data import sources
from ecdit_jax.data.pipeline import decode_text
from ecdit_jax.errors import ConfigError
from ecdit_jax.eval import fid
from ecdit_jax.eval.clip_score import clip_score
from ecdit_jax.inference.images import to_uint8

TFDS_PREFIX = "tfds:"


@dataclasses.dataclass(frozen=True)
class Reference:
  """A random-access source of real records and the feature keys to read from it."""

  source: object
  description: str
  image_key: str
  text_key: str


def reference_dataset(config, reference: str, data_dir: str | None = None, *,
                      image_size: int | None = None) -> Reference:
  """``""``: the run's dataset, test split; ``tfds:NAME[:SPLIT]``: a prepared TFDS dataset
  (config and version may be part of NAME; split defaults to ``test``) under ``data_dir``
  (default: the run's ``config.data.data_dir``). ``image_size``: the pixels of the run's own
  dataset (default: the model's; larger for a model on latents of encoded images)."""
  image_key, text_key = config.data.image_key, config.data.text_key
  if not reference and config.data.latent_dir is not None:
    raise ConfigError(f"the run trained on {config.data.dataset} (latents, no test split, no "
                      "real images): pass --reference=tfds:NAME[:SPLIT]")
  if not reference:
    source = sources.open_source(config.data, "test",
                                 image_size=image_size or config.model.image_size)
    return Reference(source, f"{config.data.dataset} (test split)", image_key, text_key)
  if not reference.startswith(TFDS_PREFIX):
    raise ConfigError(f"--reference={reference!r}: expected '' (the run's own dataset) or "
                      f"'{TFDS_PREFIX}NAME[:SPLIT]'")
  name, _, split = reference[len(TFDS_PREFIX):].partition(":")
  split = split or "test"
  data_dir = data_dir or config.data.tfds_dir
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as error:  # noqa: BLE001 - tfds raises assorted errors for a missing dataset.
    raise ConfigError(
        f"--reference={reference!r}: cannot open TFDS dataset {name!r} split {split!r} under "
        f"{data_dir} ({type(error).__name__}: {error}); prepare it there first") from error
  return Reference(source, f"{name} ({split} split)", image_key, text_key)


def reference_captions(reference: Reference, num_images: int) -> list[str]:
  """The captions of the first ``num_images`` records that have one (in record order)."""
  captions = []
  for index in range(len(reference.source)):
    if len(captions) == num_images:
      break
    record = reference.source[index]
    text = decode_text(record.get(reference.text_key)) if isinstance(record, dict) else None
    if text is not None:
      captions.append(text)
  if len(captions) < num_images:
    raise ConfigError(f"{reference.description} has only {len(captions)} usable captions "
                      f"under {reference.text_key!r}; lower --num_images")
  return captions


def reference_statistics(reference: Reference, feature_fn, num_images: int,
                         stats_path: str | None, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the first ``num_images`` real images; read from ``stats_path`` when that file
  exists, else computed (and written there when a path is given; an existing file is never
  replaced)."""
  if stats_path and epath.Path(stats_path).exists():
    return fid.load_stats(stats_path)
  stats = fid.stats_from_source(feature_fn, reference.source, image_key=reference.image_key,
                                batch_size=batch_size, max_images=num_images)
  if stats_path:  # written whole: an interrupted run never leaves a partial statistics file
    stats.save(stats_path)
  return stats.mean_and_cov()


def generate_images(sampler, params, tokenizer, null_tokens, captions: list[str],
                    text_max_len: int, *, seed: int, batch_size: int):
  """Yields uint8 image batches for ``captions`` in order; every batch has ``batch_size`` rows
  when it runs (the last is padded with null captions and trimmed), so sampling compiles once."""
  tokens = tokenizer.encode_batch(captions, text_max_len)
  for start in range(0, len(captions), batch_size):
    chunk = tokens[start:start + batch_size]
    real = len(chunk)
    if real < batch_size:
      chunk = np.concatenate([chunk, np.repeat(null_tokens[None], batch_size - real, axis=0)])
    yield to_uint8(sampler(params, chunk, null_tokens, seed, first_index=start))[:real]


def fid_and_clip(run, sampler, captions: list[str], *, feature_fn=None, reference_stats=None,
                 clip_model=None, clip_tokenizer=None, seed: int, batch_size: int) -> dict:
  """Generates one image per caption and returns {"fid": ..., "clip_score": ...} for the metrics
  whose models are given; images are consumed batch by batch, never all held at once."""
  stats = fid.FeatureStats()
  clip_sum, count = 0.0, 0
  for start, images in zip(range(0, len(captions), batch_size),
                           generate_images(sampler, run.params, run.tokenizer, run.null_tokens,
                                           captions, run.model_config.text_max_len, seed=seed,
                                           batch_size=batch_size)):
    if feature_fn is not None:
      stats.update(feature_fn(images))
    if clip_model is not None:
      result = clip_score(clip_model, clip_tokenizer, images,
                          captions[start:start + len(images)], batch_size=batch_size)
      clip_sum += float(np.sum(result["per_image"]))
    count += len(images)
  results = {"num_images": count}
  if feature_fn is not None:
    mu, sigma = stats.mean_and_cov()
    results["fid"] = fid.frechet_distance(mu, sigma, *reference_stats)
  if clip_model is not None:
    results["clip_score"] = clip_sum / count
  return results

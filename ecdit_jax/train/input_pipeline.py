"""Wires config.data to the data package: dataset on disk, tokenizer, per-process iterator.

``config.data.dataset`` is "geneval_shapes" (generated on first use), the name of a prepared
TFDS image-text dataset, or "latents:DIR": VAE latents written by ``ecdit_jax.precompute``
(records "latent"/"caption", one split that training reads whole).
"""

from __future__ import annotations

import hashlib
import os
import time

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ecdit_jax.data import geneval_shapes_tfds, latents, memory_cache, pipeline
from ecdit_jax.data import tokenizer as tokenizer_lib
from ecdit_jax.model import ConfigError, ModelConfig
from ecdit_jax.train.metrics import log_line

TOKENIZER_FILE = "tokenizer.model"  # copied into the workdir so that sampling needs no data_dir
LATENTS_PREFIX = "latents:"
LATENT_RECORD_KEYS = ("latent", "caption")  # what ecdit_jax.data.latents records hold


def latent_dir(config: ml_collections.ConfigDict) -> str | None:
  """DIR of ``config.data.dataset = "latents:DIR"``; None for image datasets."""
  dataset = config.data.dataset
  if not dataset.startswith(LATENTS_PREFIX):
    return None
  directory = dataset[len(LATENTS_PREFIX):]
  if not directory:
    raise ConfigError(f"config.data.dataset={dataset!r}: give the directory, latents:DIR")
  return os.path.expanduser(directory)


def model_on_latents(config: ml_collections.ConfigDict) -> bool:
  """Whether the model works on VAE latents: precomputed ones (latents:DIR), or images encoded
  by config.pretrained.vae as they are read (``config.data.vae_encode``)."""
  return latent_dir(config) is not None or bool(config.data.get("vae_encode", False))


def record_keys(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(image key, text key) of the dataset's records."""
  if latent_dir(config) is not None:
    return LATENT_RECORD_KEYS
  return config.data.image_key, config.data.text_key


def data_dir(config: ml_collections.ConfigDict) -> str:
  return os.path.expanduser(config.data.data_dir or "~/tensorflow_datasets")


def data_source(config: ml_collections.ConfigDict, split: str):
  """Random-access source for ``split``: GenEval-Shapes is generated here on first use; any
  other TFDS dataset must already be prepared under data_dir (ArrayRecord)."""
  dcfg = config.data
  directory = latent_dir(config)
  if directory is not None:
    if split != "train":
      raise ValueError(f"config.data.dataset={dcfg.dataset!r} has one split, read whole for "
                       f"training; there is no {split!r} split")
    return latents.LatentSource(directory)
  if dcfg.dataset == "geneval_shapes":
    builder = geneval_shapes_tfds.prepare(
        data_dir(config), image_size=config.model.image_size, num_train=dcfg.num_train,
        num_test=dcfg.num_test, seed=dcfg.generator_seed)
    return builder.as_data_source(split)
  return tfds.data_source(dcfg.dataset, split=split, data_dir=data_dir(config))


def tokenizer_for(config: ml_collections.ConfigDict, workdir: str, source):
  """The workdir's tokenizer if it has one (resuming), else config's or one trained and cached.

  The workdir copy pins the vocabulary of a run: its checkpoints are only valid with it.
  """
  in_workdir = epath.Path(workdir) / TOKENIZER_FILE
  if in_workdir.exists():
    return tokenizer_lib.load_tokenizer(in_workdir)
  dcfg = config.data
  cache = os.path.join(data_dir(config), "tokenizers",
                       f"{_cache_name(config)}_{dcfg.generator_seed}_{dcfg.num_train}_"
                       f"v{dcfg.tokenizer_vocab_size}.model")
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  _, text_key = record_keys(config)
  tok = tokenizer_lib.get_or_train_tokenizer(
      dcfg.tokenizer_path or None, cache, lambda: pipeline.read_captions(source, text_key),
      dcfg.tokenizer_vocab_size)
  src = dcfg.tokenizer_path or cache
  if jax.process_index() == 0:
    # Written whole, then renamed: a reader never sees a partial file.
    tmp = in_workdir.parent / (TOKENIZER_FILE + ".tmp")
    tmp.write_bytes(epath.Path(src).read_bytes())
    tmp.rename(in_workdir)
  return tok


def _cache_name(config: ml_collections.ConfigDict) -> str:
  """A file name for the dataset: a latent directory's path holds slashes, so it becomes its
  last component and a hash of the whole path (two directories named alike stay apart)."""
  directory = latent_dir(config)
  if directory is None:
    return config.data.dataset
  path = os.path.abspath(directory)
  digest = hashlib.sha256(path.encode("utf-8")).hexdigest()[:12]
  return f"latents_{os.path.basename(path.rstrip(os.sep)) or 'root'}_{digest}"


def check_latent_shape(config: ml_collections.ConfigDict, source) -> None:
  """For a latent dataset: its latent shape (info.json, else the first record's) must be
  (image_size, image_size, in_channels) of config.model; the error names the keys to change."""
  directory = latent_dir(config)
  if directory is None:
    return
  info = latents.read_info(directory)
  if info is not None and info.get("latent_shape"):
    shape, where = tuple(int(n) for n in info["latent_shape"]), f"{directory}/{latents.INFO_FILE}"
  else:
    shape, where = tuple(source[0]["latent"].shape), f"the first record of {directory}"
  model = config.model
  expected = (model.image_size, model.image_size, model.in_channels)
  if shape == expected:
    return
  wrong = []
  if len(shape) != 3 or shape[0] != shape[1] or shape[0] != model.image_size:
    wrong.append(f"config.model.image_size={model.image_size}")
  if len(shape) != 3 or shape[2] != model.in_channels:
    wrong.append(f"config.model.in_channels={model.in_channels}")
  raise ConfigError(f"latents of shape {shape} ({where}) do not match {' and '.join(wrong)}: "
                    f"the model expects {expected}")


def check_tokenizer_fits(tok, model_config: ModelConfig) -> None:
  if tok.vocab_size > model_config.text_vocab_size:
    raise ConfigError(f"the tokenizer has {tok.vocab_size} pieces but "
                      f"config.model.text_vocab_size={model_config.text_vocab_size}; raise it")


def null_tokens(tok, max_len: int) -> np.ndarray:
  """The empty caption, [eos, pad, ...]: the unconditional input for guidance."""
  return tok.encode_batch([""], max_len)[0]


def train_iterator(config: ml_collections.ConfigDict, source, tok, vae_factor: int = 1):
  """This process's share of the global batch, repeated forever, shuffled from config.seed.

  With ``config.data.vae_encode`` the images are center-cropped and resized to
  ``image_size * vae_factor`` pixels, which the VAE (downsampling ``vae_factor`` times) then
  encodes to ``image_size`` latents. With ``config.data.cache_in_memory`` the records are
  decoded once and batches are drawn from memory (``data.memory_cache``)."""
  per_process = config.batch_size // jax.process_count()
  image_key, text_key = record_keys(config)
  precomputed = latent_dir(config) is not None
  encode = bool(config.data.get("vae_encode", False))
  common = {"tokenizer": tok,
            "image_size": config.model.image_size * (vae_factor if encode else 1),
            "max_text_len": config.model.text_max_len, "image_key": image_key,
            "text_key": text_key,
            "latent_channels": config.model.in_channels if precomputed else None,
            "resize_images": encode}
  if config.data.get("cache_in_memory", False):
    start = time.perf_counter()
    records = memory_cache.decode_all(source, **common)
    log_line(f"decoded {len(records)} records into memory ({records.nbytes / 1e6:.1f} MB, "
             f"{records.num_skipped} skipped) in {time.perf_counter() - start:.1f} s")
    return memory_cache.CachedBatchIterator(records, per_process, config.seed)
  return pipeline.make_dataset_iterator(source, batch_size=per_process, seed=config.seed,
                                        worker_count=config.data.worker_count, **common)
